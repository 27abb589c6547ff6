"""Licence obligations per model: which licence its weights carry and what must be shown with them.

Grok-2's weights come under the xAI Community License Agreement, which asks for a "Powered by xAI"
attribution and a licence notice, allows commercial use only under xAI's Acceptable Use Policy and
forbids using outputs to train other AI models. Grok-1's weights are Apache-2.0 with none of those
limits. The two notices are kept apart per model; the LICENSE file shipped in the weights folder is
authoritative and is pointed to (and copied by `convert`), never paraphrased as if it were the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig

GROK2_LICENSE = "xAI Community License Agreement"
ATTRIBUTION = "Powered by xAI"
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt")


@dataclass(frozen=True)
class Notice:
    license: str | None  # None: the weights say nothing we can rely on
    attribution: str | None = None
    lines: list[str] = field(default_factory=list)  # what a banner or page shows, one sentence per line
    files: list[Path] = field(default_factory=list)  # licence/notice files found next to the weights

    def to_dict(self) -> dict:
        out: dict = {"license": self.license}
        if self.attribution:
            out["attribution"] = self.attribution
        if self.lines:
            out["notice"] = " ".join(self.lines)
        return out


def license_files(path: Path | None) -> list[Path]:
    """LICENSE / NOTICE files in a checkpoint folder (or next to a single-file checkpoint)."""
    if path is None:
        return []
    folder = path if path.is_dir() else path.parent
    return [folder / n for n in LICENSE_FILES if (folder / n).is_file()]


def notice_for(cfg: ModelConfig, path: Path | None = None, license: str | None = None) -> Notice:
    """The notice for a loaded model; `license` (e.g. a GGUF's general.license) names a non-Grok one."""
    files = license_files(path)
    if cfg.arch == "grok-2":
        where = f" ({files[0].name} in the weights folder)" if files else " (the LICENSE shipped with the weights)"
        return Notice(
            GROK2_LICENSE,
            ATTRIBUTION,
            [
                f"{ATTRIBUTION}. Grok 2 weights are licensed under the {GROK2_LICENSE}{where}.",
                "Commercial use is allowed only in compliance with xAI's Acceptable Use Policy; outputs may not "
                "be used to train, create or improve other AI models.",
            ],
            files,
        )
    if cfg.arch == "grok-1":
        return Notice("Apache-2.0", None, ["Grok-1 weights by xAI, licensed under Apache-2.0."], files)
    return Notice(license, None, [f"Model weights licensed under {license}."] if license else [], files)


def banner(notice: Notice) -> str:
    """The lines the CLI prints at start-up (empty when there is nothing to say)."""
    return "\n".join(notice.lines)
