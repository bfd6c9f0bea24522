"""`siglip-so400m serve`: the model behind HTTP, batched across requests (docs/serve.md).

    pip install -e ".[serve]"
    siglip-so400m serve --model google/siglip-so400m-patch14-384 --port 8000

FastAPI and uvicorn are an optional extra, imported only when the server starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..modelspec import add_model_arguments

API_KEY_ENV = "SIGLIP_SO400M_API_KEY"
# Test hook, not a setting: milliseconds the model thread sleeps before each batch, so tests can
# fill the queue with a tiny model. Leave it unset in production.
TEST_DELAY_ENV = "SIGLIP_SO400M_SERVE_TEST_DELAY_MS"


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (the usage is 20 lines of flags; --help shows it), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Serve SigLIP So400m over HTTP: /v1/embeddings, "
                                "/v1/classify, /v1/search, /health, /metrics, and with --index a page "
                                "at / (see docs/serve.md).")
    add_model_arguments(p.add_argument_group("model"), backend=True)
    p.add_argument("--index", help="a search index folder (siglip-so400m index); enables /v1/search, "
                   "and a page at / that searches it and shows its images")
    p.add_argument("--no-page", action="store_true",
                   help="with --index: serve no page at / and none of the index's images (/v1/images)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this "
                   "machine only; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (default: %(default)s)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=16, help="items per forward pass (default: 16)")
    g.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="longest wait for a fuller batch after the first item arrives (default: 10)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="items waiting for the model before requests get 503 (default: 256)")
    g.add_argument("--decode-threads", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads decoding images and tokenizing texts (default: min(4, CPUs))")
    g = p.add_argument_group("limits and security")
    g.add_argument("--max-items", type=int, default=64, help="texts and images per request (default: 64)")
    g.add_argument("--max-labels", type=int, default=256, help="labels per classify request (default: 256)")
    g.add_argument("--max-k", type=int, default=1000, help="hits per /v1/search query (default: 1000)")
    g.add_argument("--max-concurrent-bodies", type=int, default=4,
                   help="requests whose body is parsed and decoded at once (as many fetch URLs at "
                        "once); bodies being received hold their bytes within this many times "
                        "--max-request-mb in all, the others wait unread (default: 4)")
    g.add_argument("--max-request-mb", type=float, default=32.0, help="request body size (default: 32)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds from a request's start to its body's last byte, else 408 (default: 30)")
    g.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="width x height above which an image is refused unread (default: 40e6)")
    g.add_argument("--label-cache-size", type=int, default=10_000,
                   help="label embeddings kept in memory across requests (default: 10000)")
    g.add_argument("--image-cache-mb", type=float, default=64.0,
                   help="with --index: thumbnails and attention overlays kept in memory (default: 64)")
    g.add_argument("--api-key", help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV})")
    g.add_argument("--allow-urls", action="store_true",
                   help="fetch {\"image_url\": \"http(s)://...\"} images; off by default: the server then "
                        "makes requests to any host a client names")
    g.add_argument("--allow-private-urls", action="store_true",
                   help="with --allow-urls, also fetch from loopback, private, link-local and reserved "
                        "addresses (refused by default: a client could reach internal services)")
    g.add_argument("--url-timeout", type=float, default=10.0,
                   help="seconds per URL fetch in all, name lookup and redirects included (default: 10)")
    g.add_argument("--url-threads", type=int, default=8,
                   help="URL fetches at once, in threads of their own (default: 8)")
    g.add_argument("--graceful-timeout", type=float, default=60.0,
                   help="on SIGTERM, seconds to finish open requests before exiting; URL fetches "
                        "still running then are stopped (default: 60)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:  # 0: any free port, as uvicorn takes it
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (0-65535)")
    return port


def serve_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = parser(prog)
    args = p.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_items", "max_labels", "decode_threads",
                 "label_cache_size", "max_image_pixels", "max_k", "max_concurrent_bodies", "url_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_wait_ms < 0 or args.max_request_mb <= 0 or args.url_timeout <= 0 or args.body_timeout <= 0:
        p.error("--max-wait-ms must be >= 0, --max-request-mb, --url-timeout and --body-timeout > 0")
    if args.image_cache_mb < 0:
        p.error("--image-cache-mb must be at least 0")
    if args.allow_private_urls and not args.allow_urls:
        p.error("--allow-private-urls needs --allow-urls")
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (FastAPI's form parsing)
        import uvicorn
    except ImportError as e:
        print(f"error: siglip-so400m serve needs FastAPI, uvicorn and python-multipart ({e.name} is "
              "missing): pip install 'siglip_so400m[serve]'", file=sys.stderr)
        return 1

    from ..errors import SiglipError, UsageError
    from ..modelspec import ModelSpec, computed_with
    from ..weights import CheckpointError
    from .app import Server, Settings, create_app
    from .batcher import Batcher, Metrics
    from .inputs import ImageLimits

    try:
        run = ModelSpec.from_args(args).resolve()
    except UsageError as e:
        p.error(str(e))
    try:
        # A graph backend: both towers through the graphs, checked against the eager float32 model
        # before the server listens.
        ckpt = run.checkpoint()
        model, processor = run.open(("vision", "text"), ckpt=ckpt,
                                    log=lambda m: print(m, file=sys.stderr, flush=True))
        if processor.tokenizer is None:
            raise CheckpointError(f"{args.model} has no spiece.model; the server needs the tokenizer")
        index = _load_index(args.index, ckpt, computed_with(ckpt, processor, model.precision, args.backend)) \
            if args.index else None
    except UsageError as e:
        p.error(str(e))
    except (SiglipError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ckpt = model.checkpoint
    metrics = Metrics()
    batcher = Batcher(model, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000,
                      max_queue=args.max_queue, metrics=metrics, collate_images=processor.image.collate,
                      delay_s=float(os.environ.get(TEST_DELAY_ENV, 0)) / 1000)
    settings = Settings(
        model_name=ckpt.name, revision=ckpt.revision, precision=model.precision, backend=args.backend,
        raw_embeddings=getattr(model, "raw_embeddings", True),
        max_items=args.max_items, max_labels=args.max_labels,
        max_request_bytes=int(args.max_request_mb * (1 << 20)),
        image_limits=ImageLimits(max_pixels=args.max_image_pixels, allow_urls=args.allow_urls,
                                 url_max_bytes=int(args.max_request_mb * (1 << 20)),
                                 url_timeout_s=args.url_timeout,
                                 allow_private_urls=args.allow_private_urls),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        label_cache_size=args.label_cache_size, decode_threads=args.decode_threads,
        max_k=args.max_k, max_bodies=args.max_concurrent_bodies, body_timeout_s=args.body_timeout,
        url_threads=args.url_threads, page=not args.no_page,
        image_cache_bytes=int(args.image_cache_mb * (1 << 20)))
    app = create_app(Server(model, processor, settings, batcher, metrics, index))
    # Our own check refuses big images per request; PIL's process-wide warning would only be noise.
    # PIL's own refusal (at twice its limit) follows ours, so --max-image-pixels above PIL's
    # default works, and a refusal always quotes --max-image-pixels.
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_timeout, lifespan="on",
                            access_log=args.log_level == "debug")
    # uvicorn handles SIGTERM and SIGINT: it stops listening, finishes open requests, then runs the
    # app's shutdown, which drains the batcher.
    _server_class()(config).run()
    return 0


def _server_class():
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, exiting 0 after a graceful SIGTERM. uvicorn re-raises the signal once
        it has drained, so the exit status would look like an abrupt kill; here 0 tells a clean drain
        from a kill."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

    return Server


def _load_index(folder: str, ckpt, record: dict):
    """The search index (the [search] extra). Queries are embedded by the server's own model and
    processor, so the index must come from the same checkpoint, precision and patch budget: another
    model's embeddings would live in another space, and every hit would be wrong without any error."""
    from ..errors import UsageError
    from ..modelspec import QUERY_FIELDS, as_eager, check_record, fixed_size, stored_record

    try:
        from ..search import Index, SearchError
    except ImportError as e:
        raise ValueError(f"--index needs the search job's dependencies ({e}): pip install "
                         "'siglip_so400m[search]'") from None
    try:
        index = Index.load(folder)
    except UsageError:
        raise  # a stale index: exit 2, as every record mismatch
    except SearchError as e:
        raise ValueError(f"--index {folder}: {e}") from None
    if index.manifest.get("model") is None:
        raise ValueError(f"--index {folder} has no manifest.json naming the model that embedded it "
                         "(clip-retrieval's layout), so the server cannot check that its --model did; "
                         f"search it with `siglip-so400m search {folder} --model CHECKPOINT`")
    m = as_eager(stored_record(index.manifest, ckpt))
    size = fixed_size(m, ckpt)
    check_record(m, as_eager(record), f"--index {folder}", fields=QUERY_FIELDS,
                 advice=f"start the server with the settings it was embedded with (--model {m['model']}"
                        + (f" --dtype {m['dtype']}" if m.get("dtype") else "")
                        + (f" --image-size {size if isinstance(size, int) else size[0]}" if size else "")
                        + (f" --max-num-patches {m['max_num_patches']}" if m.get("max_num_patches") else "")
                        + ")")
    return index
