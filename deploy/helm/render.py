"""Render the Helm chart into plain manifests under deploy/k8s/, one file per values file, with Helm itself (PyPI's
helm-python-sdk bundles Helm's Go SDK; no helm binary, no cluster):

    python deploy/helm/render.py            # rewrite deploy/k8s/localmoe-*.yaml
    python deploy/helm/render.py --check    # exit 1 if a committed file differs from a fresh render
"""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parent / "localmoe"
K8S = CHART.parent.parent / "k8s"
RELEASE, NAMESPACE = "localmoe", "inference"
VALUES_FILES = ("values-cpu.yaml", "values-eks-gpu.yaml", "values-multi-model.yaml")


def values_of(name: str) -> dict:
    """A values file's overrides (values.yaml itself: none, the chart's defaults)."""
    return {} if name == "values.yaml" else yaml.safe_load((CHART / name).read_text())


def render(values: dict) -> str:
    """Every rendered object as one multi-document YAML stream, in template order."""
    helm.disable_logging()
    manifests = helm.Chart.load(CHART).render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    documents = [f"# Source: {path}\n{text.strip()}\n" for path, text in sorted(manifests.items())
                 if not path.endswith("NOTES.txt") and text.strip()]
    return "---\n".join(documents)


def rendered_path(values_file: str) -> Path:
    return K8S / f"localmoe-{values_file.removeprefix('values-')}"


def main() -> int:
    stale = []
    for name in VALUES_FILES:
        text = f"# Rendered by deploy/helm/render.py from deploy/helm/localmoe with {name}: do not edit.\n---\n" \
            + render(values_of(name))
        path = rendered_path(name)
        if "--check" in sys.argv:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale, rerun deploy/helm/render.py:", *stale, file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
