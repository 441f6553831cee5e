"""The CPU kernels' build (layers/cpu_kernels.py): for the -march targets LOCALMOE_CPU_TARGET names, with the
kernels' instruction sets on top of a target without them; a CPU lacking what a build assumes is told so and takes
the next target or the PyTorch paths; the cache is keyed by what the library depends on and never blocked by a
build that died."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from localmoe.layers import cpu_kernels
from localmoe.layers.cpu_kernels import Build, cpu_has_avx512_bf16
from server_process import SMALL_KV, auth, serve

ROOT = Path(__file__).resolve().parents[1]
# a process taking the build flock, then touching torch's lock file as the build it stands for would
HOLD = """import fcntl, pathlib, sys, time
lock = open(sys.argv[1], "w")
fcntl.flock(lock, fcntl.LOCK_EX)
(pathlib.Path(sys.argv[1]).parent / sys.argv[2]).touch()
print("locked", flush=True)
time.sleep(600)
"""
WHERE = "from localmoe.layers.cpu_kernels import Build, cache_dir; print(cache_dir(Build.of('native')))"
LOAD = """import logging, sys
logging.basicConfig(level=logging.INFO)
from localmoe.layers.cpu_kernels import kernels
sys.exit(kernels() is None)
"""


def test_the_key_changes_with_the_sources_torch_the_target_and_for_native_the_cpu(tmp_path, monkeypatch):
    copies = []
    for path in cpu_kernels.SOURCES + cpu_kernels.HEADERS:
        copies.append(tmp_path / path.name)
        copies[-1].write_bytes(path.read_bytes())
    monkeypatch.setattr(cpu_kernels, "SOURCES", copies[:len(cpu_kernels.SOURCES)])
    monkeypatch.setattr(cpu_kernels, "HEADERS", copies[len(cpu_kernels.SOURCES):])
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: "fpu avx512f avx512_bf16")
    monkeypatch.setattr(cpu_kernels, "compiler_version", lambda: "c++ 12.2.0")
    native, v4 = Build.of("native"), Build.of("x86-64-v4")
    base = cpu_kernels.cache_key(native)
    assert cpu_kernels.cache_key(native) == base
    keys = [base, cpu_kernels.cache_key(v4), cpu_kernels.cache_key(Build.of("sapphirerapids"))]
    for source in (copies[1], tmp_path / "tensor_args.h"):
        text = source.read_text()
        source.write_text(text + "// an edit\n")
        keys.append(cpu_kernels.cache_key(native))
        source.write_text(text)
    assert cpu_kernels.cache_key(native) == base
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    keys.append(cpu_kernels.cache_key(native))
    named = cpu_kernels.cache_key(v4)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: "fpu avx512f")  # another CPU: -march=native differs
    keys.append(cpu_kernels.cache_key(native))
    assert cpu_kernels.cache_key(v4) == named, "a named target's build serves every CPU that has what it assumes"
    monkeypatch.setattr(cpu_kernels, "compiler_version", lambda: "c++ 13.1.0")
    keys.append(cpu_kernels.cache_key(native))
    assert len(set(keys)) == len(keys)


def test_the_cache_lies_under_its_variable_else_the_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cache_key", lambda build: "key")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LOCALMOE_KERNEL_CACHE", raising=False)
    native = Build.of("native")
    assert cpu_kernels.cache_dir(native) == tmp_path / "xdg" / "localmoe" / "kernels" / "key"
    monkeypatch.setenv("LOCALMOE_KERNEL_CACHE", str(tmp_path / "ours"))
    assert cpu_kernels.cache_dir(native) == tmp_path / "ours" / "key"
    assert (tmp_path / "ours" / "key").is_dir()


# one intrinsic of each instruction set in KERNEL_ISA, as the kernels call them, beside their shared vector header
ISA_PROBE = """#include "simd_math.h"
__m512 probe(__m512 a, __m512i b, const short* p, short* q, float x) {
  _mm256_mask_storeu_epi16(q, 1, _mm256_loadu_si256((const __m256i*)p));                         // avx512vl
  const __m512i c = _mm512_dpwssd_epi32(b, _mm512_maskz_loadu_epi16(3, p), b);                  // vnni, bw
  return _mm512_dpbf16_ps(_mm512_add_ps(a, _mm512_set1_ps(x)), (__m512bh)c, (__m512bh)b);       // bf16, f
}
"""


def compile_probe(tmp_path: Path, flags: list[str]) -> subprocess.CompletedProcess:
    from torch.utils.cpp_extension import include_paths

    source = tmp_path / "probe.cpp"
    source.write_text(ISA_PROBE)
    return subprocess.run([cpu_kernels.compiler(), "-std=c++20", "-c", *flags, f"-I{cpu_kernels.HERE}",
                           *(f"-I{path}" for path in include_paths()), str(source), "-o", str(tmp_path / "probe.o")],
                          capture_output=True, text=True, timeout=600)


def test_a_generic_target_builds_with_the_kernels_instruction_sets_added(tmp_path):
    """x86-64-v3 (AVX2) and x86-64-v4 (AVX-512 without VNNI and BF16) cannot compile the kernels as they are; a
    Build for them adds what the kernels use, so it compiles, and assumes AVX512-BF16 of the CPU it runs on."""
    v3 = Build.of("x86-64-v3")
    assert v3.added == tuple(cpu_kernels.KERNEL_ISA.values())
    assert {"avx2", "fma", "avx512_bf16", "avx512_vnni"} <= v3.assumes and "avx512dq" not in v3.assumes
    assert Build.of("x86-64-v4").added == ("-mavx512vnni", "-mavx512bf16")
    assert Build.of("sapphirerapids").added == () and "amx_tile" in Build.of("sapphirerapids").assumes
    for alone in ("x86-64-v3", "x86-64-v4"):
        refused = compile_probe(tmp_path, ["-O2", f"-march={alone}"])
        assert refused.returncode != 0 and "target specific option mismatch" in refused.stderr
    built = compile_probe(tmp_path, ["-O2", *v3.flags[1:2], *v3.added])
    assert built.returncode == 0, built.stderr[-2000:]


def test_an_unknown_target_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(cpu_kernels.TARGET_VARIABLE, "sapphirerapid")
    with pytest.raises(ValueError, match="LOCALMOE_CPU_TARGET: .* has no -march=sapphirerapid"):
        cpu_kernels.Build.of(cpu_kernels.cpu_targets()[0])


@pytest.fixture
def fresh_kernels():
    """kernels() found anew in the test, and anew after it (the real library again for the tests after)."""
    cpu_kernels.kernels.cache_clear()
    yield
    cpu_kernels.kernels.cache_clear()


def test_a_cpu_without_what_the_kernels_assume_says_so_and_takes_the_pytorch_paths(fresh_kernels, monkeypatch,
                                                                                  caplog):
    flags = " ".join(flag for flag in cpu_kernels.cpu_flags().split() if flag != "avx512_bf16")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags + " avx512f avx512bw avx512vl avx512_vnni")
    monkeypatch.delenv("LOCALMOE_CPU_KERNELS", raising=False)
    monkeypatch.setenv(cpu_kernels.TARGET_VARIABLE, "x86-64-v4,native")
    monkeypatch.setattr(cpu_kernels, "build_into", lambda *args: pytest.fail("nothing is built for this CPU"))
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.kernels() is None
    said = caplog.text
    assert "this CPU lacks avx512_bf16, which the CPU kernels built for -march=x86-64-v4 assume" in said
    assert "built for -march=native assume" in said and "serving on the PyTorch paths" in said
    status = cpu_kernels.status()
    assert status["state"] == "unsupported" and status["targets"] == ["x86-64-v4", "native"]
    assert status["lacking"] == {"x86-64-v4": ["avx512_bf16"], "native": ["avx512_bf16"]}
    x = torch.randn(3, 8)
    assert not cpu_kernels.runs_here(x) and torch.equal(cpu_kernels.argmax(x), x.argmax(dim=-1))


def test_a_cpu_lacking_the_first_targets_extras_takes_the_next_target(fresh_kernels, monkeypatch, caplog,
                                                                      tmp_path):
    """An image built for sapphirerapids on a CPU with AVX512-BF16 but no AMX (a Zen 4, say): the next target,
    native, is built for it into the writable cache."""
    zen = sorted(flag for flag in Build.of("sapphirerapids").assumes if not flag.startswith("amx_"))
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: " ".join(zen))
    monkeypatch.delenv("LOCALMOE_CPU_KERNELS", raising=False)
    monkeypatch.setenv(cpu_kernels.TARGET_VARIABLE, "sapphirerapids,native")
    monkeypatch.setenv("LOCALMOE_KERNEL_CACHE", str(tmp_path))
    built = []
    monkeypatch.setattr(cpu_kernels, "build_into", lambda directory, build: built.append(build) or directory)
    monkeypatch.setattr(cpu_kernels, "load_built", lambda directory: "the library")
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.kernels() == "the library"
    assert [b.target for b in built] == ["native"]
    assert "this CPU lacks amx_bf16 amx_int8 amx_tile" in caplog.text and "-march=sapphirerapids" in caplog.text
    status = cpu_kernels.status()
    assert status["state"] == "built" and status["target"] == "native"
    assert status["lacking"] == {"sapphirerapids": ["amx_bf16", "amx_int8", "amx_tile"]}
    assert status["directory"].startswith(str(tmp_path))


def load_kernels_in_a_new_process() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
@pytest.mark.avx512_bf16
@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")
def test_a_build_killed_midway_does_not_block_the_next_process(tmp_path, monkeypatch):
    """The killed builder leaves torch's lock file behind (on which torch's own cache waited forever) and the objects
    it had compiled; its flock went with it. The next server finishes the build (ninja, on those objects: the
    session's own, so that it links rather than spends minutes compiling) and serves; a process after it loads
    the build."""
    assert cpu_kernels.kernels() is not None  # the session's build, whose objects the killed build had made
    session_build = Path(cpu_kernels.status()["directory"])
    monkeypatch.setenv("LOCALMOE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("LOCALMOE_CPU_KERNELS", raising=False)
    directory = Path(subprocess.run([sys.executable, "-c", WHERE], cwd=ROOT, capture_output=True, text=True,
                                    check=True, timeout=600).stdout.strip())  # as the server will compute it
    assert directory.name == session_build.name  # the same key: the same sources, flags and CPU
    for made in [*session_build.glob("*.o"), *(session_build / name for name in ("build.ninja", ".ninja_log",
                                                                               ".ninja_deps"))]:
        shutil.copy2(made, directory / made.name)  # mtimes kept: ninja finds them up to date
    assert not (directory / cpu_kernels.BUILT).exists() and not list(directory.glob("*.so"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory / cpu_kernels.BUILD_LOCK),
                               cpu_kernels.TORCH_BATON], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert (directory / cpu_kernels.TORCH_BATON).exists()

    # the next `localmoe serve` builds the kernels before it reports ready, then serves on them
    with serve(tmp_path, "--log-level", "info", *SMALL_KV, env={"LOCALMOE_KERNEL_CACHE": str(tmp_path)}) as server:
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "built", "max_tokens": 4},
                              headers=auth(), timeout=300)
        assert response.status_code == 200, response.text
        assert "CPU kernels built for -march=native in" in server.log() and str(directory) in server.log()
    second = load_kernels_in_a_new_process()
    assert second.returncode == 0, second.stderr
    assert f"CPU kernels loaded from {directory}" in second.stderr and "CPU kernels built" not in second.stderr
