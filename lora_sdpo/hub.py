"""Pushing an export to the Hugging Face Hub, safely (fetching a model from it is fetch.py).

A push uploads only a finished export (its export.json marker lists every file and its size) or a
finished run directory, which is exported first. Training leftovers (optimizer and RNG pickles,
training_args.bin, dataset caches, checkpoints) are never uploaded, even when listed. Repos are
created private unless --public, and an existing public repo is refused without --public.

The token is huggingface_hub's own business (HF_TOKEN, then the token file): lora-sdpo never
accepts one, never passes one, and never writes or prints one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import re
import tempfile
from pathlib import Path
from typing import Callable

from . import manifest
from .errors import PushError
from .export import MARKER, ExportPlan, plan_export, write_export
from .rundir import is_run_dir

# Never uploaded, whatever a folder or marker says: pickles can run code when loaded, caches and
# checkpoints are bulky and may hold the training data.
NEVER_UPLOAD = (
    "training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth",
    "trainer_state.json", "*.pkl", "*.pickle", "*.ckpt", "pytorch_model*.bin", "*.lock",
)
NEVER_UPLOAD_DIRS = ("hf_cache", ".cache", "trainer", "checkpoint-*", "data", "__pycache__")
TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "ssl", "socket")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def never_upload(rel: str) -> bool:
    parts = rel.split("/")
    if any(fnmatch.fnmatch(d, pat) for d in parts[:-1] for pat in NEVER_UPLOAD_DIRS):
        return True
    return any(fnmatch.fnmatch(parts[-1], pat) for pat in NEVER_UPLOAD)


def export_files(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """([(path, size)] to upload, [files left out]) of a finished export folder; refuses anything else."""
    folder = Path(folder)
    marker_path = folder / MARKER
    if not marker_path.exists():
        raise PushError(
            f"{folder}: not a finished lora-sdpo export (no {MARKER}); export a run with `lora-sdpo export`, "
            "or push the run directory itself"
        )
    listed = json.loads(marker_path.read_text()).get("files") or {}
    files = []
    for rel, size in sorted(listed.items()):
        p = folder / rel
        if never_upload(rel):
            raise PushError(f"{marker_path} lists {rel}, which lora-sdpo never uploads; export the run again")
        if p.is_symlink() or not p.is_file():
            raise PushError(f"{p}: listed in {MARKER} but missing (or a link); export the run again")
        # The card may be edited by hand before a push; any other change means a damaged export.
        if rel != "README.md" and p.stat().st_size != size:
            raise PushError(f"{p}: {p.stat().st_size} bytes, but the export wrote {size}; export the run again")
        files.append((rel, p.stat().st_size))
    files.append((MARKER, marker_path.stat().st_size))
    extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and str(p.relative_to(folder)) not in listed and p != marker_path)
    return files, extra


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _listing(files: list[tuple[str, int]]) -> list[str]:
    lines = [f"files ({len(files)}, {_size(sum(s for _, s in files))} in all):"]
    lines += [f"  {_size(s):>10}  {rel}" for rel, s in files]
    return lines


def push(
    path: Path,
    repo_id: str,
    public: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    what: str = "merged",
    step: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Upload an export folder, or a finished run directory (exported first), to `repo_id`."""
    path = Path(path).resolve()
    if not REPO_ID.match(repo_id):
        raise PushError(f"--repo-id {repo_id!r}: use OWNER/NAME, e.g. your-name/my-sdpo-model")
    if not path.is_dir():
        raise PushError(f"{path}: not a folder; give an export folder or a run directory")
    plan: ExportPlan | None = None
    if is_run_dir(path):
        status = manifest.read(path).status
        if status != "done":
            raise PushError(
                f"{path}/manifest.json: the run is not finished (status {status!r}); "
                "finish it with `lora-sdpo run`, or export a finished step with `lora-sdpo export` and push that"
            )
        plan = plan_export(path, step=step, what=what, repo_id=repo_id)
        files = [(f.path, f.size) for f in plan.files]
        card = plan.card
        source = f"run directory {path}, step {plan.step}, {plan.what} (exported on push)"
    else:
        if step is not None or what != "merged":
            raise PushError(f"{path}: --what and --step choose what to export from a run directory; this is an export folder")
        files, extra = export_files(path)
        card = (path / "README.md").read_text() if (path / "README.md").exists() else "(no README.md)"
        source = f"export folder {path}"
        if extra:
            echo(f"not part of the export, not uploaded: {', '.join(extra)}")
    target = f"{repo_id}" + (f" (branch {revision})" if revision else "")

    if dry_run:
        echo(f"dry run: nothing is uploaded. Would push {source} to {target}, "
             f"{'public' if public else 'private'} if the repo is created.")
        for line in _listing(files):
            echo(line)
        if plan is not None:
            echo(f"  + {MARKER}, the export's marker (written last, when the export is complete)")
        echo("--- README.md (model card) ---")
        echo(card)
        return {"uploaded": False, "files": files}

    # The Hub is asked first, so that a refused push costs no export.
    hub = _Hub(repo_id, public)
    exists = hub.check()
    if plan is not None:
        with tempfile.TemporaryDirectory(prefix="lora-sdpo-export-") as tmp:
            folder = write_export(plan, Path(tmp) / "export")
            echo(f"exported step {plan.step} ({plan.what}) to a temporary folder")
            return hub.upload(folder, exists, revision, echo)
    return hub.upload(path, exists, revision, echo)


class _Hub:
    """One repo on the Hub, reached through huggingface_hub, which finds the token itself."""

    def __init__(self, repo_id: str, public: bool):
        from huggingface_hub import constants, get_token

        if constants.HF_HUB_OFFLINE:
            raise PushError("HF_HUB_OFFLINE is set: unset it to push (or use --dry-run to see what would be uploaded)")
        self._token = get_token()  # only to scrub it from error messages; never passed or printed
        if self._token is None:
            raise PushError("no Hugging Face token: run `hf auth login` or set the HF_TOKEN environment variable")
        self.repo_id, self.public, self.endpoint = repo_id, public, constants.ENDPOINT

    def check(self) -> bool:
        """Whether the repo exists; refuses an existing public repo without --public."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        with self._errors():
            try:
                info = HfApi().repo_info(self.repo_id, repo_type="model")
            except RepositoryNotFoundError:
                return False
        if info.private is False and not self.public:
            raise PushError(
                f"{self.repo_id} exists and is public; nothing was uploaded. Pass --public to upload into a public repo, "
                "or choose another --repo-id"
            )
        return True

    def upload(self, folder: Path, exists: bool, revision: str | None, echo) -> dict:
        from huggingface_hub import CommitOperationAdd, HfApi

        files, _ = export_files(folder)
        marker = json.loads((folder / MARKER).read_text())
        api = HfApi()
        with self._errors(folder):
            if not exists:
                api.create_repo(self.repo_id, repo_type="model", private=not self.public, exist_ok=False)
                echo(f"created {'public' if self.public else 'private'} repo {self.repo_id}")
            elif self.public:
                echo(f"{self.repo_id} exists; its visibility is left as it is (change it on the Hub)")
            if revision:
                api.create_branch(self.repo_id, branch=revision, repo_type="model", exist_ok=True)
            commit = api.create_commit(
                self.repo_id,
                [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel, _ in files],
                commit_message=f"sDPO step {marker.get('step')} ({marker.get('what')}) exported by {marker.get('tool', 'lora-sdpo')}",
                repo_type="model",
                revision=revision,
            )
        echo(f"uploaded {len(files)} files to {self.repo_id}: {commit.commit_url}")
        return {"uploaded": True, "files": files, "commit": commit.oid, "url": commit.commit_url}

    def _scrub(self, e: Exception) -> str:
        text = str(e).replace(self._token, "***") if str(e) else type(e).__name__
        return text.splitlines()[0]

    @contextlib.contextmanager
    def _errors(self, folder: Path | None = None):
        """The Hub's and the network's failures as one line that names the repo (and never the token)."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            yield
        except PushError:
            raise
        except HfHubHTTPError as e:
            raise PushError(f"the Hub refused the push to {self.repo_id}: {self._scrub(e)}") from None
        except ValueError as e:
            if folder is not None and "README.md" in str(e):  # the Hub's check of the card's YAML metadata
                raise PushError(f"{folder / 'README.md'}: {self._scrub(e)}; fix the card's metadata and push again") from None
            raise PushError(f"push to {self.repo_id} failed: {self._scrub(e)}") from None
        except Exception as e:
            # Connection refused, DNS, TLS: the Hub cannot be reached. These come from the HTTP client
            # huggingface_hub uses (its name changes between releases), so they are matched by origin.
            if not (isinstance(e, OSError) or type(e).__module__.split(".")[0] in TRANSPORT_MODULES):
                raise
            raise PushError(f"cannot reach the Hub at {self.endpoint} to push {self.repo_id}: {self._scrub(e)}") from None
