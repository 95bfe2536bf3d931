"""`servecluster serve MODEL ...`: vLLM's `vllm serve` command line over the same Serve app.

    servecluster serve BAAI/bge-reranker-v2-m3 --task score --port 8123 --api-key KEY

builds AppArgs with one model and runs it with `serve.run`, so commands from vLLM's (and
RAGFlow's) docs work with the program name swapped. vLLM options this program does not
implement (e.g. --trust-remote-code, --tensor-parallel-size) are accepted and reported as
ignored, not refused.

`servecluster ingest DIR --vector-store NAME` uploads a folder to a running server's vector
store (deployments.ingest_cli), with progress bars.
"""
import argparse
import json
import os
import sys

from ray import serve

from cluster.shapes import cpu_shape, gpu_shape
from deployments.builder import AppArgs, ModelArgs, build_app
from deployments.ingest_cli import add_ingest_parser, ingest
from engine.config import KV_CACHE_DTYPES
from engine.quantization import QUANTIZATION_METHODS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="servecluster", description="Embedding, reranking and generation on Ray Serve")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve one model over the OpenAI/vLLM-compatible HTTP API")
    s.add_argument("model", help="Hugging Face id or local directory")
    s.add_argument("--task", default="auto", choices=["auto", "generate", "embed", "score", "classify"])
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) in the API; as in vLLM, the first one is used in responses")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_METHODS,
                   help="decoders: int8 = weight-only int8 (faster small-batch decode on CPU); int4 = weight-only "
                        "4-bit per group of 32 (llama.cpp's Q4_1; the fastest batch-1 decode on CPU); w8a8 = int8 "
                        "weights and per-token int8 activations (faster at every batch size on CPU, less accurate); "
                        "fp8 = float8 weights and per-token float8 activations (fp8 tensor cores on Hopper / Ada GPUs)")
    s.add_argument("--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPES),
                   help="decoders: fp8 = a float8 KV cache, twice bf16's tokens in the same memory "
                        "(default auto: the dtype)")
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--max-num-seqs", type=int, default=None)
    s.add_argument("--max-num-batched-tokens", type=int, default=None)
    s.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="KV-cache pool size on CPU")
    s.add_argument("--auto-truncate", action="store_true",
                   help="cut embed/score/classify inputs over --max-model-len to it instead of refusing them (TEI's)")
    s.add_argument("--gpu-memory-utilization", type=float, default=None)
    s.add_argument("--block-size", type=int, default=None)
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs for decode steps")
    s.add_argument("--torch-compile", action="store_true", default=None,
                   help="prefill and decode steps each as one torch.compile graph of the whole model, every task, "
                        "compiled at start")
    s.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule each step while the GPU runs the previous one (default: on with CUDA)")
    s.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine in a process of its own, off the server's GIL (default: on with CUDA)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--api-key", default=None, help="required as `Authorization: Bearer KEY` (env SERVECLUSTER_API_KEY)")
    s.add_argument("--allowed-origins", type=json.loads, default=[], help='CORS origins as JSON, e.g. \'["*"]\'')
    s.add_argument("--max-request-body-bytes", type=int, default=16 << 20)
    s.add_argument("--max-queued-requests", type=int, default=64)
    s.add_argument("--num-replicas", type=int, default=1)
    s.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs per replica (default: all but a sliver; 1 with --num-gpus)")
    s.add_argument("--num-gpus", type=float, default=0)
    s.add_argument("--num-threads", type=int, default=None, help="torch threads (default: --num-cpus rounded)")
    add_ingest_parser(sub)
    return p


def app_args(ns: argparse.Namespace) -> AppArgs:
    if ns.num_gpus:
        actor_options = gpu_shape(ns.num_gpus, ns.num_cpus if ns.num_cpus is not None else 1)
    else:  # the whole machine but a sliver for the ingress
        actor_options = cpu_shape(ns.num_cpus if ns.num_cpus is not None else max(0.5, (os.cpu_count() or 1) - 0.2))
    extra = {"gpu_memory_utilization": ns.gpu_memory_utilization, "block_size": ns.block_size,
             "enable_prefix_caching": ns.enable_prefix_caching, "seed": ns.seed, "enforce_eager": ns.enforce_eager,
             "torch_compile": ns.torch_compile, "async_scheduling": ns.async_scheduling,
             "engine_process": ns.engine_process, "kv_cache_dtype": ns.kv_cache_dtype}
    model = ModelArgs(
        model=ns.model, task=ns.task, served_model_name=ns.served_model_name[0] if ns.served_model_name else None,
        dtype=ns.dtype, quantization=ns.quantization, max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens, kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
        num_threads=ns.num_threads, auto_truncate=ns.auto_truncate, engine_kwargs={k: v for k, v in extra.items() if v is not None},
        deployment_config={"num_replicas": ns.num_replicas, "ray_actor_options": actor_options})
    return AppArgs(models=[model], api_key=ns.api_key, allowed_origins=ns.allowed_origins,
                   max_request_body_bytes=ns.max_request_body_bytes, max_queued_requests=ns.max_queued_requests,
                   ingress_deployment_config={"num_replicas": 1})


def main(argv: list[str] | None = None) -> None:
    ns, unknown = parser().parse_known_args(argv)
    if ns.command == "ingest":
        if unknown:
            parser().error(f"unrecognized arguments: {' '.join(unknown)}")
        sys.exit(ingest(ns))
    if unknown:
        print(f"servecluster: ignoring options it does not implement: {' '.join(unknown)}", file=sys.stderr)
    args = app_args(ns)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(build_app(args), name="default", route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
