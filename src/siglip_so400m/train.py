"""Fine-tuning with the sigmoid loss, in one process or under torchrun (DDP + the loss across ranks).

The same command gives the same run whatever the number of processes: `batch_size` is the global
batch, every step's global batch depends on the step alone (see data.GlobalBatches), and the loss
across ranks equals the global-batch loss. A checkpoint every `save_every` steps is written beside
the old one, flushed to disk, and then swapped in (the old one kept as a fallback), so a run killed
at any moment, or cut by a power failure, resumes from the last complete one and ends where an
uninterrupted run ends. Rank 0 decides where to resume and every rank must read that checkpoint.
The result is saved in the Hugging Face layout, loadable by `siglip_so400m.load` and by
`transformers.SiglipModel.from_pretrained` alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .api import load, pick_dtype
from .data import DataError, GlobalBatches, ImageTextDataset, read_pairs
from .errors import RecordMismatch, SiglipError, UsageError
from .faults import kill_point
from .loss import distributed_sigmoid_loss
from .model import SigLIP
from .modelspec import add_model_arguments, resolve_device
from .weights import (
    TOKENIZER_FILES,
    CheckpointError,
    FolderInUse,
    FolderLock,
    atomic_write,
    file_in_the_way,
    fsync,
    resolve,
)

CHECKPOINT = "checkpoint"  # the resumable state, inside the output folder


class SettingsChanged(CheckpointError, RecordMismatch):
    """A resume with other settings than the run it resumes (exit 2): it would not continue that run."""


@dataclass
class TrainConfig:
    model: str
    data: str
    output_dir: str
    steps: int
    batch_size: int = 32  # global: split across processes
    lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int | None = None  # None: 10% of the steps, at most 1000
    max_grad_norm: float | None = 1.0
    lock_image: bool = False  # LiT: keep the image tower as it is
    lock_text: bool = False
    only_logit_params: bool = False  # train only logit_scale and logit_bias
    precision: str = "auto"  # auto: bf16 autocast where the device computes bf16 natively
    grad_checkpointing: bool = False
    image_size: int | None = None  # train at this size: position embeddings resized once at load
    max_num_patches: int | None = None  # SigLIP 2 NaFlex: each image within this many patches
    save_every: int = 500  # 0: only at the end
    log_every: int = 10
    seed: int = 0
    num_workers: int = 2
    revision: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {self.image_size}")
        if self.max_num_patches is not None and self.max_num_patches < 1:
            raise ValueError(f"max_num_patches must be a positive number of patches, got "
                             f"{self.max_num_patches}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


class _Embedder(nn.Module):
    """What DDP wraps: both towers, each under no_grad when locked."""

    def __init__(self, model: SigLIP, lock_image: bool, lock_text: bool):
        super().__init__()
        self.model, self.lock_image, self.lock_text = model, lock_image, lock_text

    def forward(self, pixel_values: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock_image):
            img = self.model.encode_image(pixel_values, normalize=True)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock_text):
            txt = self.model.encode_text(input_ids, normalize=True)
        return img.float(), txt.float()


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, dev


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if pick_dtype(device) == torch.bfloat16 else None


def _schedule(cfg: TrainConfig):
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, cfg.steps // 10)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to zero at the last step
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _schedule_settings(cfg: TrainConfig, pairs: int) -> dict[str, object]:
    """What a checkpoint's state depends on, as given on the command line: the LR schedule (steps,
    lr, warm-up), the AdamW groups restored with it (weight decay), the data order (batch size,
    seed, number of pairs) and the trained position table's shape (image size). A resumed run that
    changes one of these does not continue the run it resumes, so it is refused."""
    return {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
            "pairs": pairs, "image_size": cfg.image_size}


def _flag(setting: str) -> str:
    return "--data (its number of pairs)" if setting == "pairs" else "--" + setting.replace("_", "-")


def _trainable(model: SigLIP, lock_image: bool, lock_text: bool) -> dict[str, nn.Parameter]:
    locked = {tower for tower, lock in (("vision_model", lock_image), ("text_model", lock_text)) if lock}
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] not in locked)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a fine-tuning; returns the output folder with the model in the Hub layout.
    One run at a time writes an output folder: a second one is refused (FolderInUse)."""
    out = Path(cfg.output_dir)
    if (above := file_in_the_way(out)) is not None:
        raise UsageError(f"--output {out}: {above} is a file, not a folder; give a new folder or one a "
                         "fine-tuning run wrote")
    rank, world, device = _setup_distributed(cfg.device)
    pairs = read_pairs(cfg.data)
    if cfg.batch_size > len(pairs):
        # Step s takes positions [s*B, (s+1)*B) of the stream of epochs: with B > N a batch holds
        # some pairs twice, and each copy is the other's negative (its own caption, pushed away).
        raise DataError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(pairs)} pairs "
                        f"in {cfg.data}): a batch would hold the same pair more than once, each copy a "
                        f"negative of the other; use --batch-size {len(pairs)} or less, or more data")
    held, failure = None, None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            held = FolderLock(out, "fine-tuning run")
        except FolderInUse as e:
            failure = str(e)
    if world > 1:  # every rank learns rank 0's verdict, so none waits alone at the first collective
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        raise FolderInUse(failure)
    try:
        return _train(cfg, out, rank, world, device, pairs)
    finally:
        if held is not None:
            held.release()


def _train(cfg: TrainConfig, out: Path, rank: int, world: int, device: torch.device, pairs) -> Path:
    log = _Log(rank, out)
    ckpt = resolve(cfg.model, revision=cfg.revision)
    model, processor = load(ckpt, dtype=torch.float32, device=device)
    if cfg.image_size is not None and cfg.image_size != model.config.vision_config.image_size:
        if model.config.naflex:
            raise CheckpointError("a SigLIP 2 NaFlex checkpoint trains at each image's own size: pass "
                                  "max_num_patches (--max-num-patches) instead of image_size")
        model.set_image_size(cfg.image_size)  # a new position parameter at the new grid, trained from here
        processor = processor.sized(cfg.image_size)
    if cfg.max_num_patches is not None:
        try:
            processor = processor.sized(None, cfg.max_num_patches)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    # The patch budget a NaFlex run trains at is part of what it continues.
    settings = {**_schedule_settings(cfg, len(pairs)),
                "max_num_patches": processor.image_record()["max_num_patches"]}
    model.train()
    if cfg.grad_checkpointing:
        for tower in (model.vision_model, model.text_model):
            tower.encoder.gradient_checkpointing = True
    lock_image = cfg.lock_image or cfg.only_logit_params
    lock_text = cfg.lock_text or cfg.only_logit_params
    params = _trainable(model, lock_image, lock_text)
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]  # biases, norms, logit scale and bias
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))

    identity = ckpt.identity()
    start, skipped = 0, 0
    found = _agree_on_checkpoint(out, device, rank, world, log)
    if found is not None:
        state_dir, saved = found
        start, skipped = _restore(state_dir, saved, params, opt, sched, identity, settings)
        log.info(f"resuming from step {start} ({state_dir})")

    dataset = ImageTextDataset(pairs, processor)
    # One read before the loader starts: a dataset of which no image can be read is one message
    # here, not a DataLoader worker's traceback (and costs one decoded image otherwise).
    dataset[0]
    sampler = GlobalBatches(len(pairs), cfg.batch_size, cfg.steps, start_step=start, rank=rank,
                            world=world, seed=cfg.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate,
                        num_workers=cfg.num_workers)
    net = _Embedder(model, lock_image, lock_text)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    amp = _autocast_dtype(cfg.precision, device)
    log.info(f"{len(pairs)} pairs, {cfg.steps} steps of {cfg.batch_size} on {world} process(es), "
             f"{device.type}, {'bf16 autocast' if amp else 'fp32'}, training "
             f"{sum(p.numel() for p in params.values()):,} parameters")

    bar = log.progress(cfg.steps, start)
    seen_bad: set[str] = set()
    t0 = time.perf_counter()
    for step, (pixels, ids, bad) in enumerate(loader, start=start):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            img, txt = net(pixels.to(device), ids.to(device))
        loss = distributed_sigmoid_loss(img, txt, model.logit_scale, model.logit_bias)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        skipped += round(_sum_over_ranks(len(bad), world, device))  # a count: an int in the log, not 3.0
        for msg in bad:
            if msg not in seen_bad:
                seen_bad.add(msg)
                log.warn(f"skipped unreadable image: {msg}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            global_loss = _sum_over_ranks(loss.item(), world, device) / world
            rate = (done - start) * cfg.batch_size / (time.perf_counter() - t0)
            log.step(done, loss=global_loss, lr=sched.get_last_lr()[0], images_per_s=rate, skipped=skipped)
        bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            _save_checkpoint(out, done, skipped, params, opt, sched, identity, settings, rank, world)
        kill_point("AFTER_STEP", done)
    bar.close()
    if start < cfg.steps:
        _save_checkpoint(out, cfg.steps, skipped, params, opt, sched, identity, settings, rank, world)
    if rank == 0:
        save_pretrained(model, ckpt.folder, out)
        (out / "training_args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    # The loop always runs to cfg.steps; a run resumed at its end trained nothing this time.
    note = f" (all {cfg.steps} done before this run)" if start >= cfg.steps else ""
    log.info(f"saved to {out} after {cfg.steps} steps{note}; {skipped} unreadable images skipped")
    if dist.is_initialized():
        dist.barrier()
    return out


def save_pretrained(model: SigLIP, source: Path | None, out: Path) -> None:
    """config.json + model.safetensors in the Hub layout, with the source checkpoint's tokenizer and
    preprocessor files copied beside them."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": [model.config.architecture], **model.config.to_dict()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    for name in ("preprocessor_config.json", *TOKENIZER_FILES):
        if source is not None and (source / name).is_file() and source.resolve() != out.resolve():
            shutil.copyfile(source / name, out / name)
    pre = out / "preprocessor_config.json"
    S = model.config.vision_config.image_size
    if S is None:  # NaFlex: the source's processor (its max_num_patches) stays as it was
        return
    if pre.is_file() and json.loads(pre.read_text()).get("size") != {"height": S, "width": S}:
        # Trained at another size (--image-size): processors must resize to it.
        pre.write_text(json.dumps({**json.loads(pre.read_text()), "size": {"height": S, "width": S}},
                                  indent=2) + "\n")


def _sum_over_ranks(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def _read_checkpoint(state_dir: Path, device: torch.device) -> dict:
    """Everything a checkpoint holds, read in full before anything is applied; a CheckpointError
    naming the folder if any part is missing or damaged."""
    try:
        state = json.loads((state_dir / "state.json").read_text())
        return {"state": state, "step": int(state["step"]),
                "trainable": load_file(state_dir / "trainable.safetensors"),
                "moments": load_file(state_dir / "optimizer.safetensors", device=str(device))}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{state_dir} cannot be read ({type(e).__name__}: {e})") from None


def _agree_on_checkpoint(out: Path, device: torch.device, rank: int, world: int,
                         log: _Log) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, the same on every rank, or None to start afresh.

    Rank 0 decides: the newest checkpoint, or the previous one if the newest cannot be read (a
    power cut, a full disk). Its step goes to every rank, and each rank reads that checkpoint
    itself; a rank that cannot (no shared disk) stops all of them with a clear message rather than
    resuming at another step and hanging in the first collective."""
    names = (CHECKPOINT, CHECKPOINT + ".old")  # newest first
    found, which, problems = None, -1, []
    if rank == 0:
        for i, name in enumerate(names):
            if (out / name).exists():
                try:
                    found, which = _read_checkpoint(out / name, device), i
                    break
                except CheckpointError as e:
                    problems.append(str(e))
        if problems and found is not None:
            log.warn(f"{problems[0]}; resuming from the previous checkpoint instead")
        elif problems:
            which = -2
    # (which checkpoint, its step): -1 start afresh, -2 rank 0 found none readable
    decision = torch.tensor([which, found["step"] if found else -1], dtype=torch.long, device=device)
    if world > 1:
        dist.broadcast(decision, src=0)
    which, step = int(decision[0]), int(decision[1])
    if which == -2:
        raise CheckpointError(("cannot resume: " + "; ".join(problems)) if rank == 0 else
                              "cannot resume: rank 0 found no readable checkpoint (see its message)")
    if which == -1:
        return None
    error = ""
    if rank != 0:
        try:
            found = _read_checkpoint(out / names[which], device)
            if found["step"] != step:
                error = f"{out / names[which]} holds step {found['step']}"
        except CheckpointError as e:
            error = str(e)
    if world > 1:  # every rank learns which ranks failed, so that all of them stop together
        failed = torch.zeros(world, dtype=torch.long, device=device)
        failed[rank] = bool(error)
        dist.all_reduce(failed)
        bad = [r for r in range(world) if failed[r]]
        if bad:
            raise CheckpointError(
                (f"rank {rank}: {error}; " if error else "") +
                f"rank 0 resumes from step {step} ({out / names[which]}), which rank(s) "
                f"{', '.join(map(str, bad))} cannot read. Every process must see the same output "
                "folder: put --output-dir on a disk all machines share")
    return out / names[which], found


def _save_checkpoint(out: Path, step: int, skipped: int, params: dict[str, Tensor], opt, sched,
                     identity: str, settings: dict, rank: int, world: int) -> None:
    """Trainable parameters, optimizer moments and the step, written and flushed to disk beside the
    last checkpoint, then swapped in by renames; the last one stays as the fallback. Whenever the
    process or the power dies, one complete checkpoint is on disk."""
    if rank == 0:
        tmp, final, old = out / (CHECKPOINT + ".tmp"), out / CHECKPOINT, out / (CHECKPOINT + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {k: v.detach().cpu().contiguous() for k, v in params.items()}
        save_file(trainable, tmp / "trainable.safetensors")
        opt_state = opt.state_dict()
        tensors = {f"{i}.{k}": v.cpu().contiguous() for i, s in opt_state["state"].items()
                   for k, v in s.items()}
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {"step": step, "skipped": skipped, "base": identity, "names": list(params),
                 "settings": settings,
                 "param_groups": opt_state["param_groups"], "scheduler": sched.state_dict()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in (*tmp.iterdir(), tmp):
            fsync(f)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        fsync(out)
    if world > 1:
        dist.barrier()


def _restore(state_dir: Path, saved: dict, params: dict[str, nn.Parameter], opt, sched,
             identity: str, settings: dict) -> tuple[int, int]:
    state = saved["state"]
    if state.get("base") != identity or state.get("names") != list(params):
        raise CheckpointError(f"{state_dir} belongs to another run (other base model or other "
                              "trainable parameters); use a new --output-dir or delete it")
    # Checkpoints written before the settings were saved carry none: nothing to compare.
    was = state.get("settings", settings)
    changed = [k for k in settings if k in was and was[k] != settings[k]]
    if changed:
        raise SettingsChanged(
            f"{state_dir} was saved by a run with other settings: "
            + ", ".join(f"{_flag(k)} {was[k]} then, {settings[k]} now" for k in changed)
            + ". A resumed run must keep them (they set the learning-rate schedule and the data "
            "order): rerun with the earlier values, or start a new run in another --output-dir "
            "(--model with this run's output folder starts from its saved model)")
    with torch.no_grad():
        for k, v in saved["trainable"].items():
            params[k].copy_(v)
    opt_state: dict = {"state": {}, "param_groups": state["param_groups"]}
    for key, v in saved["moments"].items():
        i, name = key.split(".", 1)
        opt_state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(opt_state)
    sched.load_state_dict(state["scheduler"])
    return state["step"], state["skipped"]


class _Log:
    """Progress and messages from rank 0: a tqdm bar on a terminal, plain lines otherwise, and every
    logged step as a JSON line in OUTPUT_DIR/train_log.jsonl."""

    def __init__(self, rank: int, out: Path):
        self.rank, self.out = rank, out
        self.bar = None

    def info(self, msg: str) -> None:
        if self.rank == 0:
            self._write(msg)

    def warn(self, msg: str) -> None:
        self._write(f"warning: {msg}")

    def _write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def progress(self, total: int, initial: int):
        shown = self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, disable=not shown)
        self.bar = bar if shown else None
        return bar

    def step(self, step: int, **values: float) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}")
        else:
            self._write(f"step {step}: loss {values['loss']:.4f}, lr {values['lr']:.2e}, "
                        f"{values['images_per_s']:.1f} img/s, {int(values['skipped'])} skipped")


# --- command line ---------------------------------------------------------------------------

def finetune_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from .train import TrainConfig

    p = argparse.ArgumentParser(prog=prog, description="Fine-tune SigLIP with the sigmoid loss, in one "
                                "process or under torchrun --nproc_per_node N (same command).")
    add_model_arguments(p, only=("model", "revision", "device", "image_size", "max_num_patches"))
    p.add_argument("--data", required=True, help="a CSV/JSONL of (image path, caption), or a folder")
    p.add_argument("--output", "-o", "--output-dir", dest="output_dir", required=True, metavar="DIR",
                   help="where checkpoints and the result go; a run there is resumed")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over processes")
    p.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate (default: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, help="linear warm-up (default: 10%% of --steps, at most "
                   "1000), then cosine decay to 0")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients (0: off)")
    lock = p.add_mutually_exclusive_group()
    lock.add_argument("--lock-image", action="store_true", help="keep the image tower fixed (LiT)")
    lock.add_argument("--lock-text", action="store_true", help="keep the text tower fixed")
    lock.add_argument("--only-logit-params", action="store_true",
                      help="train only logit_scale and logit_bias")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes per rank")
    args = vars(p.parse_args(argv))
    args["max_grad_norm"] = args["max_grad_norm"] or None
    from .train import train

    try:
        cfg = TrainConfig(**args)
    except ValueError as e:
        p.error(str(e))
    try:
        train(cfg)
    except UsageError as e:
        p.error(str(e))
    except SiglipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
