"""The engine thread behind the event loop: streaming, and aborts that free blocks."""

from __future__ import annotations

import asyncio
import time

import pytest

from localmoe.config import load_config
from localmoe.engine.async_engine import AsyncEngine
from localmoe.engine.llm_engine import LLMEngine, RequestError
from localmoe.sampling_params import SamplingParams


@pytest.fixture
def aengine(tiny_mixtral_dir):
    config = load_config(None, {"engine": {"model_name": str(tiny_mixtral_dir), "dtype": "float32",
                                           "kv_cache_memory": 2**23}})
    engine = AsyncEngine(lambda: LLMEngine.from_config(config))
    engine.start()
    yield engine
    engine.shutdown()


def test_concurrent_streams_finish(aengine):
    async def one(i: int) -> list[int]:
        last = None
        async for out in aengine.generate(f"r{i}", "hi", None, SamplingParams(max_tokens=6, ignore_eos=True)):
            last = out
        assert last.finished
        return last.outputs[0].token_ids

    async def main():
        return await asyncio.gather(*(one(i) for i in range(4)))

    results = asyncio.run(main())
    assert all(len(r) == 6 for r in results)


def test_cancelled_consumer_aborts_and_frees_blocks(aengine):
    engine = aengine.engine

    async def main():
        stream = aengine.generate("long", "hello", None, SamplingParams(max_tokens=2000, ignore_eos=True))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 2
    while engine.block_manager.usage > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.block_manager.usage == 0
    assert not engine.has_unfinished_requests()


def test_invalid_request_raises_before_any_output(aengine):
    async def main():
        async for _ in aengine.generate("bad", None, [5] * 10_000, SamplingParams()):
            pass

    with pytest.raises(RequestError, match="maximum context length"):
        asyncio.run(main())
