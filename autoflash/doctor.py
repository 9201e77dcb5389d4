"""What is installed, what is active, and why: ``autoflash doctor`` and ``autoflash.status()``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import site
import sys
from pathlib import Path
from typing import Optional

from autoflash import _startup
from autoflash.backend_names import AUTO_ORDER
from autoflash.settings import (BACKEND_VARIABLE, DISABLE_VARIABLE, EXCLUDE_VARIABLE, FAMILIES_VARIABLE, LOG_VARIABLE,
                                UNPAD_MODEL_VARIABLE, settings)


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _site_dirs():
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    return dirs, user


def startup_files() -> dict:
    """Is autoflash.pth in a directory this interpreter processes at start-up, and will its line run?"""
    dirs, user = _site_dirs()
    found = []
    for d in dirs + ([user] if user else []):
        for name in ("autoflash.pth", "autoflash.start"):
            if (Path(d) / name).is_file():
                found.append(str(Path(d) / name))
    pth = next((f for f in found if f.endswith(".pth")), None)
    reasons = []
    if pth is None:
        reasons.append("autoflash.pth is not in this interpreter's site-packages (was autoflash installed with "
                       "this python's pip?)")
    elif user and pth.startswith(str(user)) and not site.ENABLE_USER_SITE:
        reasons.append("autoflash.pth is in the user site-packages, which this interpreter does not process")
    if sys.flags.no_site:
        reasons.append("python runs with -S: no .pth file is processed")
    if settings().disabled:
        reasons.append(f"{DISABLE_VARIABLE} is set: the .pth line returns at once")
    return {"files": found, "will_run": not reasons, "reasons": reasons}


def _torch_facts():
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return None, f"torch is not importable ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return None, None
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}, None


def _example_calls(gpu):
    import torch

    from autoflash.call import AttentionCall, capability_of, deterministic_backward_asked

    device = torch.device("cuda") if gpu else torch.device("cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    common = dict(device_type=device.type, capability=capability_of(device), dtype=dtype, head_dim=128,
                  num_heads=32, num_kv_heads=8, dropout=0.0, causal=True)
    training = AttentionCall(kind="varlen", q_len=2048, kv_len=2048, needs_grad=True,
                             deterministic=deterministic_backward_asked(), **common)
    decode = AttentionCall(kind="cache", q_len=1, kv_len=2048, needs_grad=False, left_padded_cache=True, **common)
    return {"training (padded batch, LLaMA-3-8B heads)": training, "decode (left-padded kv cache)": decode}


def _rank() -> Optional[dict]:
    """This process's place in a distributed job (torchrun, accelerate launch and the like set these), else None."""
    names = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK"}
    if "RANK" not in os.environ:
        return None
    return {key: int(os.environ[name]) if os.environ.get(name, "").isdigit() else None for key, name in names.items()}


def _hook_problem() -> Optional[str]:
    """Why the import hook is not (or could not be) registered in this process, with what to do; else None."""
    from autoflash import hooks

    if hooks.state()["hooks_registered"]:
        return None
    problem = _startup.arm_error
    if problem is None:
        try:  # not armed yet (transformers not imported): would it arm?
            import wrapt  # noqa: F401
        except BaseException as exc:  # noqa: BLE001
            problem = f"wrapt is not importable ({type(exc).__name__}: {exc})"
    if problem is None:
        return None
    return f"{problem}; nothing is patched. autoflash needs wrapt: pip install wrapt"


def status() -> dict:
    from autoflash import hooks

    gpu, torch_problem = _torch_facts()
    hook_problem = _hook_problem()
    result = {
        "autoflash": _version("autoflash"),
        "active": not settings().disabled and not hooks.state()["user_disabled"] and hook_problem is None
        and (bool(hooks.patched_modules()) or hooks.state()["hooks_registered"] or _startup._trigger in sys.meta_path),
        "disabled_by_env": settings().disabled,
        "patched": hooks.patched_modules(),
        "families": hooks.families(),
        "other_models": {},  # model type -> adopted or not, and why (models built in this process)
        "last_error": hooks.state()["last_error"] or hook_problem,
        "settings": settings().as_dict(),
        "startup": startup_files(),
        "versions": {"python": sys.version.split()[0], "torch": _version("torch"),
                     "transformers": _version("transformers"), "flash-attn": _version("flash-attn") or
                     _version("flash_attn"), "flash-attn-4": _version("flash-attn-4"), "wrapt": _version("wrapt")},
        "gpu": gpu,
        "rank": _rank(),
        "padding_removal": {"whole_model": settings().unpad_model, "last": None},
        "handed_over": [],  # calls autoflash does not serve, computed by transformers' own attention
        "traced": {},  # what programs traced by torch.compile / torch.export in this process were built with
        "backends": [],
        "choices": {},
    }
    if torch_problem:
        result["backends"] = [{"name": n, "available": False, "reasons": [torch_problem]}
                              for n in AUTO_ORDER]
        result["bottom_line"] = bottom_line(result)
        return result
    from autoflash import adoption, backends, dispatch, handover, tracing, unpad_model

    result["other_models"] = adoption.decisions()
    result["padding_removal"]["last"] = unpad_model.last_decision()
    result["traced"] = dict(tracing.traced_paths)
    result["handed_over"] = handover.handed_over()

    for backend in backends.AUTO_ORDER:
        reasons = backend.unavailable_reasons()
        entry = {"name": backend.name, "available": not reasons, "reasons": reasons}
        if not reasons and hasattr(backend, "details"):  # what a backend adds: FlashAttention-4's compilations
            entry.update(backend.details())
        result["backends"].append(entry)
    for label, call in _example_calls(gpu).items():
        try:
            result["choices"][label] = dispatch.describe_choice(call)
        except Exception as exc:  # noqa: BLE001
            result["choices"][label] = {"call": call.describe(), "backend": None, "error": str(exc)}
    result["bottom_line"] = bottom_line(result)
    return result


def bottom_line(data: dict) -> str:
    """What serves training and decoding on this machine, and the one thing that would make it faster."""
    if data["disabled_by_env"]:
        return f"off ({DISABLE_VARIABLE} is set): transformers' own attention runs; unset it to use autoflash"
    if not data["active"]:
        return f"not active in this process ({data['last_error'] or 'see below'})"
    backend = {label.split(" ")[0]: choice.get("backend") or "no backend" for label, choice in data["choices"].items()}
    training, decoding = backend.get("training"), backend.get("decode")
    if training is None:
        return f"torch is not importable here: nothing runs ({data['backends'][0]['reasons'][0]})"
    serves = f"training and decoding run {training}" if training == decoding else \
        f"training runs {training}, decoding runs {decoding}"
    gpu = data["gpu"]
    available = {b["name"] for b in data["backends"] if b["available"]}
    if gpu is None:
        faster = "an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Hopper, Blackwell) runs flash kernels"
    elif float(gpu["capability"]) < 8.0:
        faster = f"flash kernels need compute capability 8.0 or newer; this GPU is {gpu['capability']}"
    elif training == "sdpa":
        faster = ('pip install "autoflash[flash-attn]" (flash-attn 2), or torch 2.9 or newer (its own varlen '
                  'kernel): see the refusals below')
    elif float(gpu["capability"]) >= 9.0 and "flash_attn_4" not in available:
        faster = 'pip install "autoflash[fa4]" (FlashAttention-4, tried first on Hopper and Blackwell)'
    else:
        faster = "nothing to install: the fastest kernels autoflash knows serve this GPU"
    return f"{serves} here; faster: {faster}"


def report(data: dict) -> str:
    rank = data.get("rank")
    lines = [f"autoflash {data['autoflash'] or '(not installed as a distribution)'}: {bottom_line(data)}"
             + (f"  [rank {rank['rank']} of {rank['world_size']}, local rank {rank['local_rank']}]" if rank else "")]
    if data["disabled_by_env"]:
        lines.append(f"  DISABLED by {DISABLE_VARIABLE}: nothing is registered, nothing patched")
    else:
        lines.append(f"  active in this process: {'yes' if data['active'] else 'no'}"
                     + (f"; patched: {', '.join(data['patched'])}" if data["patched"] else
                        " (patches each model family's module when it is imported)" if data["active"] else ""))
    if data["last_error"]:
        lines.append(f"  last problem: {data['last_error']}")
    lines.append("model families:")
    lines += [f"  {name:<8} {state}" for name, state in data.get("families", {}).items()]
    if data.get("other_models"):
        lines.append("other models built in this process (each decoder on transformers' attention interface):")
        lines += [f"  {name:<8} {state}" for name, state in data["other_models"].items()]
    start = data["startup"]
    lines.append("start-up hook:")
    for f in start["files"] or ["(no autoflash.pth / autoflash.start found)"]:
        lines.append(f"  {f}")
    lines.append(f"  runs in new interpreters: {'yes' if start['will_run'] else 'no'}")
    lines += [f"    - {r}" for r in start["reasons"]]
    lines.append("switches:")
    for name in (DISABLE_VARIABLE, BACKEND_VARIABLE, LOG_VARIABLE, UNPAD_MODEL_VARIABLE, EXCLUDE_VARIABLE,
                 FAMILIES_VARIABLE):
        given = os.environ.get(name)
        lines.append(f"  {name}={given!s:<10} -> {data['settings'][name]}" if given is not None else
                     f"  {name:<22} (unset) -> {data['settings'][name]}")
    removal = data["padding_removal"]
    lines.append("padding removal: " + ("whole model where it changes no answer, else per layer"
                                        if removal["whole_model"] else f"per layer only ({UNPAD_MODEL_VARIABLE}=0)"))
    if removal["last"]:
        last = removal["last"]
        lines.append(f"  last padded forward in this process: {last['path']}"
                     + (f" ({last['reason']})" if last["reason"] else ""))
        head = last.get("lm_head_and_loss")
        if head:
            lines.append(f"    its LM head and loss: on the {head['on']}" + (f" ({head['reason']})" if head["reason"] else ""))
    for path, why in data.get("traced", {}).items():
        lines.append(f"  traced ({path}): {why}")
    for entry in data.get("handed_over", []):
        lines.append(f"handed to transformers: {entry['call']}: {entry['to']} (asked for: {entry['asked_for']}; "
                     f"calls: {entry['count']})")
    lines.append("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in data["versions"].items()))
    gpu = data["gpu"]
    lines.append(f"gpu: {gpu['name']} (compute capability {gpu['capability']})" if gpu else "gpu: none")
    lines.append("backends (best first):")
    for b in data["backends"]:
        lines.append(f"  {b['name']:<13} {'available' if b['available'] else 'unavailable'}")
        lines += [f"      - {r}" for r in b["reasons"]]
        if "disk_cache" in b:
            lines.append(f"      kernel cache on disk: {b['disk_cache']}")
        lines += [f"      compiled in this process: {what} ({seconds} s)"
                  for what, seconds in b.get("compiled", {}).items()]
    for label, choice in data["choices"].items():
        lines.append(f"{label}: {choice['call']}")
        lines.append(f"  -> {choice['backend'] or 'no backend: ' + choice.get('error', '')}")
        for refused in choice.get("refused", []):
            lines.append(f"     {refused['backend']} refused: {'; '.join(refused['reasons'])}")
    return "\n".join(lines)


def main(as_json: bool) -> int:
    data = status()
    print(json.dumps(data, indent=2) if as_json else report(data))
    return 0
