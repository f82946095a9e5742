"""`lpjepa index build` and `lpjepa search`: embed a data set into an index, query it with an image.

Heavy imports (onnxruntime via export.runtime, numpy, scipy, faiss) happen inside the handlers so that
`lpjepa --help` stays fast. Every expected failure (bad model, data spec, image, index files, options) raises
its stage's error, which `lpjepa` (cli.errors) reports as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cli.argtypes import positive_int as _positive_int
from cli.errors import CliError
from cli.parser import OneLineParser
from core.atomic_io import file_sha256
from index.milvus_cli import add_milvus_arguments, milvus_options, reject_milvus_flags_without_backend
from index.thumbnails import DEFAULT_PX as DEFAULT_THUMBNAIL_PX
from index.thumbnails import MAX_PX as MAX_THUMBNAIL_PX

CHUNK_IMAGES = 1024  # images embedded and added per step: bounds memory, keeps the progress bar moving
TUNE_QUERIES = 256  # stored vectors used as queries when tuning approximate FAISS indexes


def _thumbnail_px(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    if not 0 <= value <= MAX_THUMBNAIL_PX:
        raise argparse.ArgumentTypeError(f"expected 0 (no thumbnails) to {MAX_THUMBNAIL_PX} pixels, got {value}")
    return value


def _recall_target(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return i, n


def shard_rows(n: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """Rows [lo, hi) of shard I of N over n rows: contiguous, sizes differ by at most one, together all rows."""
    if shard is None:
        return 0, n
    i, parts = shard
    return i * n // parts, (i + 1) * n // parts


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="build a vector index of a data set's embeddings")
    actions = index.add_subparsers(dest="index_command", metavar="ACTION", parser_class=OneLineParser)
    actions.required = True
    _register_build(actions)
    repair = actions.add_parser(
        "repair",
        help="recover the server's database (serve.sqlite3) of an index directory after damage",
        description="Copy every intact row of INDEX_DIR/serve.sqlite3 (CRC-checked) into a new database, keep the "
        "damaged file as serve.sqlite3.damaged-<time>, and report what was kept and lost; salvages an old "
        "serve-wal.log that the migration refused. Run it when `lpjepa serve` refuses to start on damaged state.",
    )
    repair.add_argument("index_dir", help="index directory served by `lpjepa serve --index`")
    repair.set_defaults(func=_cmd_repair)

    search = subparsers.add_parser("search", help="find the indexed images most similar to an image")
    search.add_argument("--model", required=True, help="exported model (.onnx), the one that built the index")
    search.add_argument("--index", help="index directory written by `lpjepa index build` (csr, faiss)")
    search.add_argument(
        "--backend", choices=("csr", "faiss", "milvus"), help="milvus: search --collection at --milvus-uri"
    )
    search.add_argument("--image", required=True, help="query image file")
    search.add_argument("-k", "--k", type=_positive_int, default=10, help="number of results (default 10)")
    search.add_argument("--json", action="store_true", help='print {"results": [{"id", "score", "payload"}]}')
    add_milvus_arguments(search)
    search.set_defaults(func=_cmd_search)


def _register_build(actions: argparse._SubParsersAction) -> None:
    build = actions.add_parser(
        "build",
        help="embed every image of a data spec and write an index directory",
        description="Embed a data set with an exported model and save an index; the id of each vector is the "
        "image's row number in the data set (split), its payload {label, source, row}.",
    )
    build.add_argument("--model", required=True, help="exported model (.onnx)")
    build.add_argument("--data", required=True, help="data spec: fashion-mnist[:test], mnist, or an image folder")
    build.add_argument("--out", help="index directory to create or replace atomically (csr, faiss)")
    build.add_argument(
        "--backend",
        choices=("csr", "faiss", "milvus"),
        default="csr",
        help="default: csr (exact, sparse); milvus writes into --collection at --milvus-uri instead of --out",
    )
    build.add_argument(
        "--faiss-index",
        default="Flat",
        metavar="SPEC",
        help="with --backend faiss: Flat (exact), IVF[nlist][,Flat] or HNSW[M][,Flat] (default Flat)",
    )
    build.add_argument(
        "--csr-mode",
        choices=("exact", "approx"),
        default="exact",
        help="with --backend csr: exact (default) or approx (pruned lists, exact rescoring; tuned on held-out "
        "images to --target-recall, e.g. 0.997)",
    )
    build.add_argument(
        "--metric",
        choices=("cosine", "ip"),
        default="cosine",
        help="cosine (default) ranks by direction, so an image's overall activation level does not dominate",
    )
    build.add_argument("--batch-size", type=_positive_int, default=64, help="images per model call")
    build.add_argument("--limit", type=_positive_int, help="index only the first N images")
    build.add_argument(
        "--target-recall",
        type=_recall_target,
        default=0.95,
        help="IVF/HNSW: raise nprobe/efSearch until recall@10 on sample queries reaches this; csr approx: the"
        " fastest setting reaching it (default 0.95)",
    )
    build.add_argument(
        "--thumbnails",
        type=_thumbnail_px,
        default=DEFAULT_THUMBNAIL_PX,
        metavar="PX",
        help=f"store a PNG thumbnail per image, longest side at most PX pixels (never enlarged; 0 = none;"
        f" at most {MAX_THUMBNAIL_PX}; default {DEFAULT_THUMBNAIL_PX}), shown by the server's web page",
    )
    build.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="with --backend milvus: embed only the I-th of N contiguous slices of the data set (0-based) into the "
        "shared collection, so N processes or machines build one index; without it an existing collection is replaced",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_milvus_arguments(build, index_kind=True)
    build.set_defaults(func=_cmd_build)


def embed_source(
    runtime: Any,
    source: Any,
    spec: str,
    n: int,
    *,
    batch_size: int,
    progress: bool,
    thumbnail_px: int = 0,
    start: int = 0,
) -> Iterator[tuple[Any, Any, list[dict[str, Any]], list[bytes | None] | None]]:
    """Yield (ids, CSR embeddings, payloads, thumbnails) for rows start..n-1 of ``source`` in chunks of CHUNK_IMAGES.

    Thumbnails (PNG, longest side ``thumbnail_px``) are made from the decoded image the model sees, so they show
    exactly what was indexed; None for the whole chunk when ``thumbnail_px`` is 0.
    """
    import numpy as np
    from tqdm import tqdm

    from index.thumbnails import thumbnail_png

    classes = list(getattr(source, "classes", []) or [])
    with tqdm(total=n - start, desc="index build", unit="img", disable=not progress, file=sys.stderr) as bar:
        for lo in range(start, n, CHUNK_IMAGES):
            hi = min(n, lo + CHUNK_IMAGES)
            images, payloads = [], []
            thumbs: list[bytes | None] | None = [] if thumbnail_px else None
            for row in range(lo, hi):
                image, label = source[row]
                images.append(image)
                if thumbs is not None:
                    thumbs.append(thumbnail_png(image, thumbnail_px) if hasattr(image, "mode") else None)
                payload: dict[str, Any] = {"label": label, "source": spec, "row": row}
                if label is not None and 0 <= label < len(classes):
                    payload["class"] = classes[label]
                payloads.append(payload)
            embeddings = runtime.embed(images, batch_size=batch_size)
            bar.update(hi - lo)
            yield np.arange(lo, hi, dtype=np.int64), embeddings, payloads, thumbs


Chunk = tuple  # (ids, vectors, payloads[, thumbnails]): per-item lists may be None


def fill_index(
    index: Any,
    chunks: Iterable[Chunk],
    *,
    total: int | None = None,
    target_recall: float = 0.95,
    tune_queries: int = TUNE_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Add embedding chunks to ``index``; tune approximate FAISS indexes. Returns a summary dict.

    A chunk is ``(ids, vectors, payloads)`` or ``(ids, vectors, payloads, thumbnails)``; the per-item lists
    travel with their rows through the hold-back and gathering below.

    Tuning needs queries the index has not seen: a stored vector is trivially easy to find (in HNSW its own
    node sits next to its neighbours), which flattered the recall by several points in tests. So when
    ``total`` is known, about ``tune_queries`` random rows are held back, used as tuning queries against the
    rest, and added afterwards. An untrained IVF index gets all chunks in one add, because its k-means must see
    the whole distribution, not the first chunk (which, for data sorted by class, would be one class).
    """
    import numpy as np

    kind = getattr(index, "kind", None)
    csr_approx = getattr(index, "mode", None) == "approx"
    approx = kind in ("ivf", "hnsw") or csr_approx
    gather = kind == "ivf" and index.nlist is None
    hold = min(1.0, tune_queries / total) if approx and total else 0.0
    rng = np.random.default_rng(seed)
    pending: list[Chunk] = []
    held: list[Chunk] = []
    for raw in chunks:
        chunk = _full_chunk(raw)
        if hold:
            back = rng.random(chunk[0].size) < hold
            if back.all():
                back[0] = False  # keep at least one row in the index to tune against
            held.append(_subset(chunk, back))
            chunk = _subset(chunk, ~back)
        if gather:
            pending.append(chunk)
        elif chunk[0].size:
            index.add(*chunk)
    if pending:
        index.add(*_concat(pending))
    summary: dict[str, Any] = {"count": len(index)}
    if approx and len(index):
        if held and sum(h[0].size for h in held):
            held_chunk = _concat(held)
            if csr_approx:
                report = index.tune_approx(held_chunk[1], k=10, target_recall=target_recall)
                summary["tuned"] = {key: v for key, v in report.items() if key != "tried"}  # the summary is one line
            else:
                summary["tuned"] = index.tune(held_chunk[1], k=10, target_recall=target_recall)
            index.add(*held_chunk)
        elif csr_approx:  # total unknown: the csr index has no own-id rule; tune on new rows only, so skip
            summary["tuned"] = None
        else:  # total unknown: stored vectors as queries, each one's own id left out of the recall
            all_ids = index.ids()
            sample = np.sort(rng.choice(all_ids, size=min(tune_queries, all_ids.size), replace=False))
            summary["tuned"] = index.tune(
                index.reconstruct(sample), k=10, target_recall=target_recall, query_ids=sample
            )
        summary["count"] = len(index)
    return summary


def _full_chunk(chunk: Chunk) -> Chunk:
    import numpy as np

    if len(chunk) not in (3, 4):
        raise ValueError(f"a chunk is (ids, vectors, payloads[, thumbnails]), got {len(chunk)} parts")
    ids, vectors, payloads, *rest = chunk
    return np.asarray(ids), vectors, payloads, rest[0] if rest else None


def _subset(chunk: Chunk, mask: Any) -> Chunk:
    import numpy as np
    import scipy.sparse as sp

    ids, vectors, *columns = chunk
    rows = np.flatnonzero(mask)
    sub = sp.csr_matrix(vectors)[rows] if sp.issparse(vectors) else np.asarray(vectors)[rows]
    return (ids[rows], sub, *(None if col is None else [col[i] for i in rows] for col in columns))


def _concat(parts: list[Chunk]) -> Chunk:
    import numpy as np
    import scipy.sparse as sp

    ids = np.concatenate([p[0] for p in parts])
    vectors = sp.vstack([sp.csr_matrix(p[1]) for p in parts], format="csr")
    columns = [
        None
        if all(p[c] is None for p in parts)
        else [x for p in parts for x in (p[c] if p[c] is not None else [None] * p[0].size)]
        for c in range(2, len(parts[0]))
    ]
    return (ids, vectors, *columns)


def _cmd_build(args: argparse.Namespace) -> int:
    """Embed ``--data`` with ``--model`` and save an index in ``--out`` (or the Milvus collection the milvus flags
    name, the options of :class:`index.milvus_index.MilvusIndex`); prints the summary as one JSON line.

    With Milvus, ``--shard I/N`` embeds only slice I of N (``shard_rows``) into the shared collection, which is
    created by whichever shard comes first and must hold the same model's vectors; without a shard an existing
    collection is dropped and rebuilt (not atomic: Milvus has no collection swap).
    """
    from data.sources import open_source
    from export.runtime import EmbeddingRuntime
    from index.factory import create_index

    reject_milvus_flags_without_backend(args)
    backend, model, data, shard, batch = args.backend, args.model, args.data, args.shard, args.batch_size
    milvus = milvus_options(args) if backend == "milvus" else None
    t0 = time.perf_counter()
    _check_destination(args)
    options: dict[str, Any] = {"spec": args.faiss_index} if backend == "faiss" else dict(milvus or {})
    if backend == "csr" and args.csr_mode != "exact":
        options["mode"] = args.csr_mode
    runtime = EmbeddingRuntime(model, batch_size=batch)
    model_sha = file_sha256(model)
    if backend == "milvus" and shard is None:
        from index.milvus_index import drop_collection

        drop_collection(**options)
    index = create_index(backend, runtime.dim, args.metric, **options)  # bad options fail before any embedding
    src = open_source(data)
    n = len(src) if args.limit is None else min(args.limit, len(src))
    if n == 0:
        raise CliError(f"data spec {data!r} holds no images")
    metadata = {
        "model": {"path": str(Path(model).resolve()), "sha256": model_sha, "dim": runtime.dim},
        "data": data,
        "images": n,
    }
    if backend == "milvus" and index.metadata:  # a shard joining a collection another shard created
        _check_same_build(index.metadata, metadata, options["collection"])
    index.metadata = metadata
    lo, hi = shard_rows(n, shard)
    chunks = embed_source(
        runtime, src, data, hi, batch_size=batch, progress=not args.no_progress, thumbnail_px=args.thumbnails, start=lo
    )
    summary = fill_index(index, chunks, total=hi - lo, target_recall=args.target_recall)
    manifest = index.save(args.out)
    result = {
        "out": None if args.out is None else str(args.out),
        "backend": backend,
        "faiss_index": args.faiss_index if backend == "faiss" else None,
        "metric": args.metric,
        "dim": runtime.dim,
        "count": manifest["count"],
        "thumbnails": index.thumbnail_count,
        "thumbnail_bytes": manifest["files"].get("thumbnails", {}).get("bytes", 0),
        "tuned": summary.get("tuned"),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if backend == "milvus":
        shard_name = None if shard is None else f"{shard[0]}/{shard[1]}"
        result.update(collection=options["collection"], milvus_index=index.index_kind, shard=shard_name, rows=[lo, hi])
    print(json.dumps(result))
    return 0


def _check_destination(args: argparse.Namespace) -> None:
    if args.backend == "milvus":
        if args.out is not None:
            raise CliError("--out is for csr and faiss; a milvus index is written to --collection at --milvus-uri")
    else:
        if args.out is None:
            raise CliError(f"--backend {args.backend} needs --out DIR")
        if args.shard is not None:
            raise CliError("--shard needs --backend milvus (the shards write into one shared collection)")


def _check_same_build(found: dict[str, Any], ours: dict[str, Any], collection: str) -> None:
    """A shard may only join a collection built from the same model file, data spec and number of images."""
    built_with = (found.get("model") or {}).get("sha256")
    if (built_with, found.get("data"), found.get("images")) != (ours["model"]["sha256"], ours["data"], ours["images"]):
        raise CliError(
            f"collection {collection!r} holds another build (model sha256 {str(built_with)[:12]}, "
            f"data {found.get('data')!r}, {found.get('images')} images); the shards of one "
            "index need the same --model, --data and --limit"
        )


def _cmd_repair(args: argparse.Namespace) -> int:
    from serve.repair import repair

    try:
        report = repair(args.index_dir)
    except (ValueError, OSError) as err:  # no index, unloadable snapshot: only a restore from backup helps
        raise CliError(
            f"cannot repair {args.index_dir}: {_one_line(err)}; restore the directory from a backup"
        ) from None
    print(json.dumps(report.as_dict()))
    if report.lost_after_snapshot or report.unreadable_regions:
        print(
            f"lpjepa index repair: {report.lost_after_snapshot} damaged writes after the last snapshot are lost and "
            f"{report.unreadable_regions} regions were unreadable; restore from a backup if you need them",
            file=sys.stderr,
        )
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    """Embed ``--image`` and print its top ``k`` in the index directory ``--index`` or, with the milvus flags, a
    collection: a table best first, or with ``--json`` {"results": [{"id", "score", "payload"}, ...]}."""
    from export.runtime import EmbeddingRuntime
    from index.factory import load_index

    reject_milvus_flags_without_backend(args)
    milvus = milvus_options(args) if args.backend == "milvus" else None
    if milvus is None and not args.index:
        raise CliError("give --index DIR, or --backend milvus --milvus-uri URI")
    if milvus is not None and args.index:
        raise CliError("--index is for csr and faiss; with --backend milvus give --milvus-uri and --collection")
    runtime = EmbeddingRuntime(args.model, batch_size=1)
    if milvus is not None:
        from index.milvus_index import open_milvus_index

        index = open_milvus_index(**milvus, expected_dim=runtime.dim)
    else:
        index = load_index(args.index, expected_dim=runtime.dim)
    path = Path(args.image)
    if not path.is_file():
        raise CliError(f"no image file at {path}")
    query = runtime.embed([path.read_bytes()])
    scores, ids = index.search(query, args.k)
    found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
    payloads = index.payloads([i for i, _ in found])
    results = [{"id": i, "score": s, "payload": p} for (i, s), p in zip(found, payloads, strict=True)]
    built_with = (index.metadata.get("model") or {}).get("sha256")
    if built_with and built_with != file_sha256(args.model):
        sys.stderr.write(
            "lpjepa search: warning: the index was built with a different model file; scores may be meaningless\n"
        )
    if args.json:
        print(json.dumps({"results": results}))
        return 0
    print(f"{'rank':>4}  {'id':>10}  {'score':>9}  payload")
    for rank, hit in enumerate(results, 1):
        print(f"{rank:>4}  {hit['id']:>10}  {hit['score']:>9.5f}  {json.dumps(hit['payload'])}")
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
