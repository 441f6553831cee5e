"""The `localmoe` command: `serve` (OpenAI-compatible server) and `generate` (one prompt, offline).

Engine flags are made from EngineConfig's fields, one per key in vLLM's spelling
(`max_num_seqs` -> `--max-num-seqs`, `model_name` -> `--model`), so every key in the `vllm:`
section of the config file is reachable from the command line and the two never drift apart.
A flag left out leaves the file's value alone.
"""

from __future__ import annotations

import functools
import inspect
import logging
import logging.config
import os
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import uvicorn
from fastapi import FastAPI

from localmoe.config import DEFAULT_CONFIG_PATH, Config, ConfigError, EngineConfig, ServerConfig, load_config
from localmoe.engine.async_engine import AsyncEngine
from localmoe.engine.llm_engine import LLMEngine
from localmoe.llm import LLM
from localmoe.planner import PlanError, plan_command
from localmoe.sampling_params import SamplingParams, SamplingParamsError
from localmoe.server.app import build_app
from localmoe.server.drain import DrainingServer
from localmoe.distributed.data_parallel import ReplicaStartError
from localmoe.server.dp_app import serve_data_parallel
from localmoe.server.usage_counters import CountersUnavailable
from localmoe.server.instance_ports import instance_ports, listening_sockets
from localmoe.server.request_log import json_log_config
from localmoe.server.tgi import tgi_environment
from localmoe.train.corpus import build_corpus, summary
from localmoe.train.trainer import TrainConfig
from localmoe.train.trainer import train as run_training

# click's own help layout (rich_markup_mode=None): rich's tables cut long option names to fit 80 columns
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="LocalMoE: serve Mixture-of-Experts models with an OpenAI-compatible API.")

# Exit codes: 2 for a configuration that cannot be used (as for bad usage), 1 for a model that cannot be loaded.
EXIT_CONFIG, EXIT_LOAD = 2, 1
GRACEFUL_CLOSE_SECONDS = 5  # after the drain, for connections to finish sending what they have
CONFIG_HELP = ("YAML file with model:, vllm: (or engine:) and server: sections; flags override it. "
               f"[default: {DEFAULT_CONFIG_PATH.relative_to(DEFAULT_CONFIG_PATH.parents[1])} where the checkout "
               "has one]")


def engine_flag(key: str) -> str:
    return "--model" if key == "model_name" else "--" + key.replace("_", "-")


def flag_help(section: type, key: str) -> str:
    """A config key's help (written beside the key in config.py) with its default, as `--help` shows it."""
    f = next(f for f in fields(section) if f.name == key)
    return f.metadata.get("help", "") + ("" if f.default in (None, "") else f" [default: {f.default}]")


def _engine_flag_parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(EngineConfig)
    parameters = []
    for f in fields(EngineConfig):
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        flag = engine_flag(f.name)
        declaration = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
        option = typer.Option(declaration, help=flag_help(EngineConfig, f.name))
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[Optional[kind], option]))
    return parameters


def with_engine_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` one option per EngineConfig key; they arrive in its `engine_flags` dict."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "engine_flags"]
    keys = {f.name for f in fields(EngineConfig)}

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        flags = {k: kwargs.pop(k) for k in list(kwargs) if k in keys}
        command(**kwargs, engine_flags=flags)

    wrapper.__signature__ = inspect.Signature(own + _engine_flag_parameters())  # type: ignore[attr-defined]
    del wrapper.__wrapped__  # typer must read the signature above, not the wrapped one's
    return wrapper


def default_config_file(config_file: Path | None) -> Path | None:
    """An explicit --config, else configs/config.yaml where the checkout has one."""
    return config_file or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)


def config_from_flags(config_file: Path | None, engine_flags: dict[str, Any], **server: Any) -> Config:
    """The configuration `serve` runs with: the file, then every flag that was given."""
    return load_config(default_config_file(config_file), {"engine": engine_flags, "server": server})


def fail(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def configure_logging(level: str, log_format: str = "text") -> None:
    """LocalMoE's own log lines (kernel builds, failed requests, health, drain) beside uvicorn's, at its level; as
    JSON with each request's id for json (server/request_log.py; uvicorn is given the same config)."""
    if log_format == "json":
        logging.config.dictConfig(json_log_config(level))
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger = logging.getLogger("localmoe")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if level == "trace" else level.upper())


def load_engine(config: Config) -> LLMEngine:
    """The engine for `config`; a checkpoint that cannot be served ends the command with its reason."""
    try:
        return LLMEngine.from_config(config)
    except ConfigError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    except ValueError as e:  # the loader's verdict on an unsupported or broken checkpoint
        raise fail(str(e), EXIT_LOAD) from None


def serving_app(config: Config) -> FastAPI:
    """Load every model of `config` and build the app that serves them."""
    engines = [(AsyncEngine(lambda own=own: load_engine(own), config.server.engine_stall_timeout), own)
               for own in config.served()]
    served = {aengine.engine.model_name for aengine, _ in engines}
    # multi-LoRA: an adapter's base_model_name names one of the models served
    unknown = sorted({base for _, own in engines for _, _, base in own.engine.lora_module_list
                      if base not in (None, *served)})
    if unknown:
        raise fail(f"lora_modules: base_model_name {unknown[0]!r} is not a served model ({', '.join(sorted(served))})",
                   EXIT_CONFIG)
    return build_app(engines, config)


def run_server(config: Config) -> None:
    """Load the model, then serve it until a signal drains it (server/drain.py)."""
    configure_logging(config.server.log_level, config.server.log_format)
    if config.server.redis_url is not None:  # tenants: the shared counters answer, or nothing starts
        from localmoe.server.redis_counters import check_redis  # the redis client only where it is used

        try:
            check_redis(config.server.redis_url)
        except CountersUnavailable as e:
            raise fail(str(e), EXIT_CONFIG) from None
    # data parallelism: replicas, each a server of its own, behind this process (distributed/data_parallel.py)
    if any(engine.data_parallel_size != 1 and engine.data_parallel_rank is None for engine in config.engines):
        try:
            serve_data_parallel(config, GRACEFUL_CLOSE_SECONDS)
        except ConfigError as e:
            raise fail(str(e), EXIT_CONFIG) from None
        except ReplicaStartError as e:
            raise fail(str(e), e.exit_code) from None
        return
    try:  # vllm_instances' own ports, bound before any model loads (server/instance_ports.py)
        ports = instance_ports(config)
        sockets = listening_sockets(config, ports) if ports else None
    except ConfigError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    app = serving_app(config)
    host, port = config.server.host, config.server.port
    names = ", ".join(model.name for model in app.state.models)
    typer.echo(f"Serving {names} at http://{host}:{port}/v1"
               + "".join(f", {name} at http://{host}:{own_port}/v1 too" for own_port, name in ports.items()))
    settings = uvicorn.Config(app, host=host, port=port, log_level=config.server.log_level,
                              timeout_graceful_shutdown=GRACEFUL_CLOSE_SECONDS,
                              **({"log_config": json_log_config(config.server.log_level)}
                                 if config.server.log_format == "json" else {}))
    DrainingServer(settings, app.state.drain).run(sockets)


@app.command()
@with_engine_flags
def serve(
    config: Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP)] = None,
    host: Annotated[Optional[str], typer.Option(help=flag_help(ServerConfig, "host"))] = None,
    port: Annotated[Optional[int], typer.Option(help=flag_help(ServerConfig, "port"))] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="LOCALMOE_API_KEY", help=flag_help(ServerConfig, "api_key"))] = None,
    admin_api_key: Annotated[Optional[str], typer.Option(
        "--admin-api-key", envvar="LOCALMOE_ADMIN_API_KEY", help=flag_help(ServerConfig, "admin_api_key"))] = None,
    log_level: Annotated[Optional[str], typer.Option(help=flag_help(ServerConfig, "log_level"))] = None,
    shutdown_timeout: Annotated[Optional[float], typer.Option(
        help=flag_help(ServerConfig, "shutdown_timeout"))] = None,
    engine_stall_timeout: Annotated[Optional[float], typer.Option(
        help=flag_help(ServerConfig, "engine_stall_timeout"))] = None,
    chat_template: Annotated[Optional[str], typer.Option(help=flag_help(ServerConfig, "chat_template"))] = None,
    enable_auto_tool_choice: Annotated[Optional[bool], typer.Option(
        "--enable-auto-tool-choice", help=flag_help(ServerConfig, "enable_auto_tool_choice"))] = None,
    tool_call_parser: Annotated[Optional[str], typer.Option(help=flag_help(ServerConfig, "tool_call_parser"))] = None,
    # tenants: keys with roles, limits and priorities; counters shared through Redis
    api_keys_file: Annotated[Optional[str], typer.Option(
        envvar="LOCALMOE_API_KEYS_FILE", help=flag_help(ServerConfig, "api_keys_file"))] = None,
    redis_url: Annotated[Optional[str], typer.Option(
        envvar="LOCALMOE_REDIS_URL", help=flag_help(ServerConfig, "redis_url"))] = None,
    log_format: Annotated[Optional[str], typer.Option(help=flag_help(ServerConfig, "log_format"))] = None,
    otlp_traces_endpoint: Annotated[Optional[str], typer.Option(
        help=flag_help(ServerConfig, "otlp_traces_endpoint"))] = None,
    *,
    engine_flags: dict[str, Any],
) -> None:
    """Serve a checkpoint (or the built-in model) over an OpenAI-compatible HTTP API."""
    try:
        tgi = tgi_environment(dict(os.environ))  # a TGI deployment's settings, under the flags
        engine_flags = {**tgi["engine"], **{k: v for k, v in engine_flags.items() if v is not None}}
        host, port, api_key = (value if value is not None else tgi["server"].get(key)
                               for key, value in (("host", host), ("port", port), ("api_key", api_key)))
        settings = config_from_flags(config, engine_flags, host=host, port=port, api_key=api_key,
                                     admin_api_key=admin_api_key,
                                     log_level=log_level, shutdown_timeout=shutdown_timeout,
                                     engine_stall_timeout=engine_stall_timeout, chat_template=chat_template,
                                     enable_auto_tool_choice=enable_auto_tool_choice,
                                     tool_call_parser=tool_call_parser,
                                     api_keys_file=api_keys_file, redis_url=redis_url,
                                     log_format=log_format, otlp_traces_endpoint=otlp_traces_endpoint)
    except ValueError as e:  # a ConfigError, or a TGI variable that does not parse
        raise fail(str(e), EXIT_CONFIG) from None
    run_server(settings)


@app.command()
@with_engine_flags
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    config: Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP)] = None,
    max_tokens: Annotated[int, typer.Option(help="Maximum number of tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(
        help="Float that controls the randomness of the sampling; 0 means greedy sampling.")] = 1.0,
    top_p: Annotated[float, typer.Option(
        help="Cumulative probability of the top tokens to consider, in (0, 1]; 1: all tokens.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Number of top tokens to consider; 0 or -1: all tokens.")] = 0,
    min_p: Annotated[float, typer.Option(
        help="Minimum probability of a token, relative to the most likely one's, in [0, 1]; 0: off.")] = 0.0,
    sampling_seed: Annotated[Optional[int], typer.Option(
        help="Random seed for this request's sampling. If unspecified, the engine's generator.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string; repeat for several.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep going past the end-of-sequence token.")] = False,
    *,
    engine_flags: dict[str, Any],
) -> None:
    """Generate a continuation of PROMPT offline and print it."""
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                min_p=min_p, seed=sampling_seed, stop=stop or [], ignore_eos=ignore_eos)
        model = engine_flags.pop("model_name")
        config = default_config_file(config)
        llm = LLM(model=model, config=str(config) if config else None,
                  **{k: v for k, v in engine_flags.items() if v is not None})
    except (ConfigError, SamplingParamsError) as e:
        raise fail(str(e), EXIT_CONFIG) from None
    except ValueError as e:
        raise fail(str(e), EXIT_LOAD) from None
    typer.echo(llm.generate([prompt], params)[0].outputs[0].text)


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory; built from the package sources if absent.")] = Path(
        "corpus"),
    steps: Annotated[int, typer.Option(help="Optimizer steps (the run is step-based, not timed).")] = TrainConfig.steps,
    hidden_size: Annotated[int, typer.Option(help="Width of the residual stream.")] = TrainConfig.hidden_size,
    intermediate_size: Annotated[int, typer.Option(
        help="Width of each expert's feed-forward layer.")] = TrainConfig.intermediate_size,
    num_layers: Annotated[int, typer.Option(
        help="Decoder layers (attention, then an MoE block).")] = TrainConfig.num_layers,
    num_heads: Annotated[int, typer.Option(help="Attention (query) heads per layer.")] = TrainConfig.num_heads,
    num_kv_heads: Annotated[int, typer.Option(
        help="Key/value heads per layer (grouped-query attention).")] = TrainConfig.num_kv_heads,
    num_experts: Annotated[int, typer.Option(help="Experts per MoE layer.")] = TrainConfig.num_experts,
    top_k: Annotated[int, typer.Option(help="Experts each token is routed to.")] = TrainConfig.top_k,
    vocab_size: Annotated[int, typer.Option(
        help="Tokens in the byte-level BPE vocabulary trained on the corpus.")] = TrainConfig.vocab_size,
    context: Annotated[int, typer.Option(help="Tokens per training window.")] = TrainConfig.context,
    batch_size: Annotated[int, typer.Option(help="Windows per optimizer step.")] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(
        help="Peak learning rate of AdamW (linear warm-up, then cosine decay).")] = TrainConfig.lr,
    eval_every: Annotated[int, typer.Option(
        help="Steps between held-out perplexity evaluations.")] = TrainConfig.eval_every,
    seed: Annotated[int, typer.Option(help="Random seed of initialisation and data order.")] = TrainConfig.seed,
    warmup_steps: Annotated[int, typer.Option(
        help="Steps of linear learning-rate warm-up.")] = TrainConfig.warmup_steps,
    init_from: Annotated[Optional[Path], typer.Option(
        help="Continue from this checkpoint (its weights and tokenizer; the shape options are ignored).")] = None,
    repeat_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of training windows that repeat a passage, teaching the model to quote "
                               "its context.")] = TrainConfig.repeat_fraction,
    copy_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of training windows that repeat a passage of random tokens, where only "
                               "copying predicts anything.")] = TrainConfig.copy_fraction,
    max_passage: Annotated[int, typer.Option(
        min=16, help="Longest repeated passage in tokens (at most half the context).")] = TrainConfig.max_passage,
    induction_weight: Annotated[float, typer.Option(
        min=0.0, help="Weight of the loss that teaches an induction circuit in the repeated windows: heads 0 and 2 "
                      "of the layer before --induction-layer attend to the two tokens before, heads 0-3 of that "
                      "layer to the copy source and predict it; 0 leaves the heads free.")] = TrainConfig.induction_weight,
    induction_layer: Annotated[int, typer.Option(
        min=1, help="The layer whose heads --induction-weight teaches to copy; the previous-token heads are taught "
                    "in the layer before it.")] = TrainConfig.induction_layer,
    add_heads: Annotated[int, typer.Option(
        min=0, help="Widen each attention layer of the --init-from model by this many heads (their output starting "
                    "at zero) and train those alone, leaving every other weight as it was; --induction-weight then "
                    "teaches the new heads.")] = TrainConfig.add_heads,
    freeze_moe: Annotated[bool, typer.Option(
        help="Train attention, norms, embeddings and head only, keeping the MoE blocks (routers and experts) as "
             "they are.")] = TrainConfig.freeze_moe,
) -> None:
    """Train the built-in MoE on public-domain English and write a Hugging Face checkpoint."""
    try:
        cfg = TrainConfig(corpus_dir=corpus, out_dir=out, steps=steps, hidden_size=hidden_size,
                          intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, num_experts=num_experts, top_k=top_k, vocab_size=vocab_size,
                          context=context, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                          warmup_steps=warmup_steps, init_from=init_from, repeat_fraction=repeat_fraction,
                          copy_fraction=copy_fraction, max_passage=max_passage, induction_weight=induction_weight,
                          induction_layer=induction_layer, add_heads=add_heads, freeze_moe=freeze_moe)
    except ValueError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    if not (corpus / "train.txt").exists():
        typer.echo(summary(build_corpus(corpus)))
    report = run_training(cfg)
    typer.echo(f"held-out perplexity {report['heldout_perplexity']:.2f} after {steps} steps "
               f"({report['wall_seconds']:.0f} s); expert imbalance per layer {report['expert_imbalance']}; "
               f"checkpoint in {out}")


@app.command()
def plan(
    model: Annotated[str, typer.Argument(
        help="Checkpoint directory, config.json, a well-known model name, or a hub id ORG/NAME (its config.json "
             "from the Hugging Face cache, downloaded where the network allows).")],
    dtype: Annotated[str, typer.Option(help="The checkpoint's dtype: bf16, fp16.")] = "bf16",
    quantization: Annotated[str, typer.Option(
        help="auto (a quantized checkpoint's own bits and groups, else none), int8, int4, experts_int8 (quantized "
             "at load), awq, gptq, compressed-tensors, fp8 (what such a checkpoint takes in memory).")]
    = "auto",
    device: Annotated[str, typer.Option(help="H100-80GB, A100-80GB, A100-40GB, L40S-48GB or cpu:GiB.")] = "H100-80GB",
    max_model_len: Annotated[Optional[int], typer.Option(
        help="Context per sequence, in tokens. If unspecified, min(max_position_embeddings, 32768).")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Sequences served at once.")] = 256,
    kv_cache_dtype: Annotated[str, typer.Option(
        help="Data type for kv cache storage: auto (the --dtype) or fp8 (one byte, plus a scale per row).")]
    = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a report.")] = False,
    tensor_parallel_size: Annotated[int, typer.Option(
        help="Plan this many ranks: memory per rank and the bytes each collective moves per token.")] = 1,
    enable_expert_parallel: Annotated[bool, typer.Option(
        help="With --tensor-parallel-size or --data-parallel-size: routed experts spread whole over the ranks.")]
    = False,
    data_parallel_size: Annotated[int, typer.Option(
        help="With --enable-expert-parallel: plan this many data-parallel ranks, each whole but for its share of "
             "the routed experts.")] = 1,
) -> None:
    """Plan memory: parameters, weight and KV bytes, the parallel degree or expert cache that fits."""
    try:
        typer.echo(plan_command(model, dtype, device, max_model_len, max_num_seqs, kv_cache_dtype, json_output,
                                quantization, tensor_parallel_size, enable_expert_parallel, data_parallel_size))
    except PlanError as e:
        raise fail(str(e), EXIT_CONFIG) from None


if __name__ == "__main__":
    app()
