"""The serving bundle: its layout, its checksummed manifest, and the calibration table's look-ups.

A bundle (written by `hrjax export`, atomically) is one directory:

  manifest.json                  format + version, library versions, the served name, the action names,
                                 the policy / encoder / env (with its context view) / pool sections, sha256
                                 and size of every file below, and `manifest_sha256` (the digest of the
                                 manifest's own content)
  policy/exported.bin            `jax.export` policy: (params, embedding [b, E], hop [b], cost features [b, 2],
                                 cost_lambda [b], action mask [b, A]) -> log-probabilities [b, A] (masked)
  policy/params_<i>.safetensors  its parameters: one set per trained lambda (fixed-lambda routers: the run's
                                 own and the evaluation sweep's), or one set for a lambda-conditioned router
  encoder/exported.bin           `jax.export` context encoder over packed texts: (params, input_ids [b, t],
                                 segment_ids [b, t]) -> [b, (t + 1) // 2, D], a slot per text
                                 (`hrjax.models.sentence_batches`; E = D times the parts of the context view)
  encoder/params.safetensors     its parameters;  encoder/tokenizer/: its HF tokenizer
  pool/<name>/                   a pool member's HF files (small local checkpoints), or in the manifest a
                                 reference to a checkpoint outside the bundle with its content fingerprint
  calibration.json               mean cost, quality and share of calls to the most expensive model of the
                                 router on the selection prompts, at each lambda (`lambda_for_budget`)
  config.json                    the run config the router was trained with

`load_bundle` refuses, with a `BundleError` naming the file and the fix, a bundle of another format
version, a changed manifest, a missing, changed or unlisted file, and a referenced checkpoint whose
content differs from what was exported. Nothing here imports the training code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Optional

from hrjax.errors import HrjaxError

FORMAT = "hrjax-bundle"
# 2: env.context_view, how observations embed the context (`hrjax.env.mdp.CONTEXT_VIEWS`);
# 3: the encoder embeds texts packed into rows (segment ids, not an attention mask)
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
STOP = "STOP"


class BundleError(HrjaxError, ValueError):
    """A bundle that cannot be served as it is (tampered, incomplete, another version), or a request
    for a trade-off it does not offer."""


class UnknownModelError(BundleError):
    """A served model name the bundle does not offer."""


class BudgetError(BundleError):
    """A cost budget no calibrated lambda meets."""


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def library_versions() -> dict:
    """The versions a bundle records: hrjax, jax, jaxlib, flax, Python."""
    import importlib.metadata
    import platform

    out = {"python": platform.python_version()}
    for name in ("hrjax", "jax", "jaxlib", "flax"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _listed_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content (canonical JSON) without its `manifest_sha256` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(root: str | os.PathLike, manifest: dict) -> dict:
    """Completes `manifest` (format, versions, every file's sha256 and size, its own digest) and writes
    it as root/manifest.json; -> the completed manifest. Call it last, on the finished directory."""
    root = Path(root)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": library_versions(), **manifest,
                "files": {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
                          for rel in _listed_files(root)}}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory and manifest (see the module docstring)."""

    path: Path
    manifest: dict

    def file(self, relative: str) -> Path:
        return self.path / relative

    def read_json(self, relative: str):
        return json.loads(self.file(relative).read_text())

    @property
    def served_name(self) -> str:
        return self.manifest["served_name"]

    @property
    def action_names(self) -> list[str]:
        return list(self.manifest["actions"])

    @property
    def calibration(self) -> dict:
        return self.read_json(self.manifest["calibration"])

    @property
    def config(self) -> dict:
        return self.read_json(self.manifest["config"])

    def env_config(self):
        """The `hrjax.env.mdp.EnvConfig` the router was trained in (hops, STOP, cost, hop template, generation,
        context view)."""
        from hrjax.env.mdp import EnvConfig, HopTemplate

        env = dict(self.manifest["env"])
        return EnvConfig(**{**env, "template": HopTemplate(**env["template"]), "stop": tuple(env["stop"])})

    def locate(self, entry: Optional[dict]) -> Optional[str]:
        """A checkpoint entry of the pool section -> its path (inside the bundle, or the referenced one)."""
        if entry is None:
            return None
        return str(self.file(entry["bundled"])) if "bundled" in entry else entry["path"]

    def pool_specs(self) -> list:
        """The pool's `hrjax.pool.ModelSpec`s, in action order, their checkpoints located."""
        from hrjax.pool import ModelSpec

        return [ModelSpec(name=m["name"], checkpoint=self.locate(m["checkpoint"]), base_rate=m["base_rate"],
                          tokenizer=self.locate(m["tokenizer"]), use_chat_template=m["use_chat_template"],
                          prompt_template=m["prompt_template"], dtype=m["dtype"]) for m in self.manifest["pool"]]


def load_bundle(path: str | os.PathLike, digest_index: Optional[str | os.PathLike] = None) -> Bundle:
    """Reads and verifies the bundle at `path` (see the module docstring) -> `Bundle`; raises
    `BundleError` on anything that differs from what `hrjax export` wrote. `digest_index`: a file
    memoising the digests of referenced (not bundled) checkpoints (`hrjax.pool.FileDigests`)."""
    root = Path(path).expanduser()
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root}: no {MANIFEST}, so this is not a serving bundle (or its manifest was deleted). "
                          "Write one with `hrjax export --workdir=RUN --out=BUNDLE`.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{manifest_path}: unreadable ({e}); the bundle is damaged: export it again.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an hrjax bundle manifest (format {manifest.get('format')!r} "
                          f"if any, expected {FORMAT!r}). Export one with `hrjax export`.")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{root}: bundle format version {version!r}, but this hrjax reads version {FORMAT_VERSION} "
                          f"(bundle written by hrjax {manifest.get('versions', {}).get('hrjax', '?')}). Export the "
                          "run again with this hrjax, or serve it with the hrjax that wrote it.")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BundleError(f"{manifest_path}: the manifest's content does not match its recorded digest: it was "
                          "edited or damaged after export. Export the bundle again.")
    listed = manifest["files"]
    for rel, entry in sorted(listed.items()):
        file = root / rel
        if not file.is_file():
            raise BundleError(f"{root}: file '{rel}' listed in the manifest is missing. The bundle is incomplete: "
                              "copy it again in full, or export it again.")
        if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
            raise BundleError(f"{root}: file '{rel}' changed after export (its sha256 differs from the "
                              "manifest's). The bundle is damaged or was tampered with: export it again.")
    unlisted = sorted(set(_listed_files(root)) - set(listed))
    if unlisted:
        raise BundleError(f"{root}: file '{unlisted[0]}' is not in the manifest ({len(unlisted)} unlisted in all); "
                          "a bundle serves only what was exported. Remove it, or export the bundle again.")
    _verify_references(root, manifest, digest_index)
    return Bundle(root, manifest)


def _verify_references(root: Path, manifest: dict, digest_index) -> None:
    from hrjax.pool import FileDigests, checkpoint_fingerprint

    digests = FileDigests(digest_index)
    for member in manifest["pool"]:
        for what in ("checkpoint", "tokenizer"):
            entry = member.get(what)
            if entry is None or "bundled" in entry:
                continue
            if not Path(entry["path"]).exists():
                raise BundleError(f"{root}: pool model '{member['name']}' references the {what} {entry['path']}, "
                                  "which does not exist here. Put it at that path, or export a bundle that holds it.")
            found = checkpoint_fingerprint(entry["path"], digests)
            if found != entry["fingerprint"]:
                raise BundleError(f"{root}: pool model '{member['name']}': the {what} at {entry['path']} is not the "
                                  f"one exported (content {found}, exported {entry['fingerprint']}). Restore it, or "
                                  "export the bundle again.")
    digests.save()


# ------------------------------------------------------------------------------------ calibration look-ups

def lambda_for_budget(calibration: dict, cost: Optional[float] = None, share: Optional[float] = None) -> dict:
    """The calibration entry a budget selects: of the entries whose mean cost is <= `cost` (or whose
    share of calls to the most expensive model is <= `share`), the highest mean quality, ties to the
    lower cost. Raises `BudgetError` when no entry meets the budget."""
    if (cost is None) == (share is None):
        raise BudgetError("Give one budget: a mean cost per query, or a share of calls to the most expensive model.")
    key, budget = ("cost", cost) if cost is not None else ("expensive_share", share)
    entries = calibration["entries"]
    meets = [e for e in entries if e[key] <= budget + 1e-9]
    if not meets:
        floor = min(e[key] for e in entries)
        what = "mean cost" if cost is not None else f"share of calls to {calibration['most_expensive_model']}"
        raise BudgetError(f"No calibrated lambda keeps the {what} within {budget:g}: the lowest is {floor:g}. "
                          "Raise the budget.")
    return max(meets, key=lambda e: (e["quality"], -e["cost"], -e["cost_lambda"]))


_NAME = re.compile(r"^(?P<base>[^@]+)(?:@(?P<kind>cost|share|lambda)=(?P<value>[0-9.eE+-]+))?$")


def parse_model_name(name: str, served_name: str) -> tuple[Optional[str], Optional[float]]:
    """'<served>' -> (None, None); '<served>@cost=X' / '@share=Y' / '@lambda=Z' -> (kind, value).
    Raises `UnknownModelError` for any other name."""
    match = _NAME.match(str(name))
    value = None
    if match and match["value"] is not None:
        try:
            value = float(match["value"])
        except ValueError:
            match = None
    if not match or match["base"] != served_name or (value is not None and not (math.isfinite(value) and value >= 0)):
        raise UnknownModelError(f"Unknown model '{name}': this bundle serves '{served_name}', "
                                f"'{served_name}@cost=X' (a mean cost budget per query), '{served_name}@share=Y' "
                                f"(a share of calls to the most expensive model) and '{served_name}@lambda=Z'.")
    return match["kind"], value


def offers(calibration: dict, served_name: str, default_lambda: float) -> dict[str, float]:
    """Served model name -> cost_lambda: `served_name` at the bundle's own lambda, and per calibration
    entry `<served_name>@cost=X` with X its mean cost rounded up to 3 decimals (so the budget admits it)
    at the lambda that budget selects (`lambda_for_budget`)."""
    out = {served_name: float(default_lambda)}
    for budget in sorted({math.ceil(e["cost"] * 1000 - 1e-6) / 1000 for e in calibration["entries"]}):
        out[f"{served_name}@cost={budget:g}"] = float(lambda_for_budget(calibration, cost=budget)["cost_lambda"])
    return out
