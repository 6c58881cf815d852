"""The public IQA sets `qponder data get` fetches: where each lives and what its terms are.

Sources (read 2026-12, cited so a reader can check them):

* Archives: the Hugging Face dataset repo `chaofengc/IQA-PyTorch-Datasets`, the mirror pyiqa
  (IQA-PyTorch) downloads from — `pyiqa/data/dataset_api.py` in github.com/chaofengc/IQA-PyTorch
  maps koniq10k -> koniq10k.tgz, kadid10k -> kadid10k.tgz, spaq -> spaq.tgz,
  livec -> live_challenge.tgz. The repo's file list also holds AGIQA-3K.zip. Sizes below are the
  ones the Hub shows for those files (spaq.tgz's LFS pointer: size 34841101349).
* Labels: pyiqa's meta-info CSVs in `chaofengc/IQA-PyTorch-Datasets-metainfo`
  (`meta_info_<Name>Dataset.csv`; since the "merge split to meta info" commit each carries its
  train/val/test splits as columns: `official_split` where the set has one, else
  `ratio802_seed123_split_01..10`, see pyiqa/data/base_iqa_dataset.py `get_split`). That repo
  has no AGIQA-3K file, so AGIQA-3K's labels come from DeQA-Score's metas
  (`zhiyuanyou/Data-DeQA-Score`, `AGIQA3K/metas/test_agiqa_3k.json`, named in DeQA-Score's
  scripts/infer.sh).
* Archive layouts: pyiqa/default_dataset_configs.yml (`dataroot_target`): koniq10k/512x384 and
  koniq10k/1024x768, kadid10k/images, SPAQ/TestImage, LIVEC (Images/, the 7 training photos in
  Images/trainingImages/).
* Terms: each set's own page; the mirror's card says cc-by-sa-4.0, which covers the mirror's
  packaging, not the photos and scores — the originals' terms apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PYIQA_ARCHIVES = "chaofengc/IQA-PyTorch-Datasets"
PYIQA_META = "chaofengc/IQA-PyTorch-Datasets-metainfo"
DEQA_META = "zhiyuanyou/Data-DeQA-Score"


@dataclass(frozen=True)
class Resolution:
    name: str  # "1024x768"
    images_dir: str  # folder of the images, relative to --out


@dataclass(frozen=True)
class IQASet:
    name: str  # what `qponder data get NAME` takes
    title: str
    images: int
    download_bytes: int  # the archive's size on the Hub
    resolutions: tuple[Resolution, ...]  # the first is the default
    archive_repo: str
    archive_file: str
    label_repo: str
    label_file: str  # path inside label_repo; lands at <out>/<label_dir>/<basename>
    label_dir: str  # where the label file goes under --out (pyiqa's layout: meta_info/)
    label_format: str  # a qponder_mlx.labels format
    terms: str
    cite: str
    eval_split: str | None = None  # split value to evaluate on (None: the whole file)
    train_split: str | None = None  # split value to train/distill on (None: none published)
    mos_range: tuple[float, float] | None = None  # --mos-range to pass, when the format's own
    # native range does not hold
    note: str = ""
    aliases: tuple[str, ...] = field(default=())
    # Where an archive whose tree we could not read goes as a whole (None: its top-level folders
    # go straight into --out, as pyiqa unpacks them).
    unpack_into: str | None = None

    @property
    def source(self) -> str:
        return (f"hf://datasets/{self.archive_repo}/{self.archive_file} + "
                f"hf://datasets/{self.label_repo}/{self.label_file}")

    @property
    def member_ceiling(self) -> int:
        # Images, their folders and the label files, with room for a few resolutions.
        return 4 * self.images + 1000


# The LIVE notice shipped with the database (Copyright (c) 2015 The University of Texas at
# Austin): "to use, copy, modify, and distribute this database ... for any purpose, provided
# that the copyright notice in its entirety appear in all copies ... and the original source
# ... is acknowledged in any publication that reports research using this database".
_LIVE_TERMS = ("UT Austin LIVE copyright notice: use, copy, modify and distribute for any "
               "purpose, keeping the notice in all copies and acknowledging LIVE in publications")

SETS: tuple[IQASet, ...] = (
    IQASet(
        name="koniq10k", title="KonIQ-10k", images=10_073, download_bytes=6_350_000_000,
        resolutions=(Resolution("512x384", "koniq10k/512x384"),
                     Resolution("1024x768", "koniq10k/1024x768")),
        archive_repo=PYIQA_ARCHIVES, archive_file="koniq10k.tgz",
        label_repo=PYIQA_META, label_file="meta_info_KonIQ10kDataset.csv", label_dir="meta_info",
        label_format="pyiqa", eval_split="test", train_split="train",
        terms=("research use; photos are Flickr (YFCC100M) images under their authors' "
               "Creative Commons licences"),
        cite="Hosu et al., KonIQ-10k, IEEE TIP 2020",
        note="official split 7,058 train / 1,000 val / 2,015 test",
        aliases=("koniq", "koniq-10k"),
    ),
    IQASet(
        name="spaq", title="SPAQ", images=11_125, download_bytes=34_841_101_349,
        resolutions=(Resolution("original", "SPAQ/TestImage"),),
        archive_repo=PYIQA_ARCHIVES, archive_file="spaq.tgz",
        label_repo=PYIQA_META, label_file="meta_info_SPAQDataset.csv", label_dir="meta_info",
        label_format="pyiqa", eval_split="val", train_split="train",
        terms="non-commercial research and education use (SPAQ's release terms)",
        cite="Fang et al., Perceptual Quality Assessment of Smartphone Photography, CVPR 2020",
        note=("full-size phone photos (most ~4000x3000); pyiqa resizes them to 448 px when "
              "loading. No official split: pyiqa's 80/20 split 1 (seed 123)"),
    ),
    IQASet(
        name="kadid10k", title="KADID-10k", images=10_125, download_bytes=3_070_000_000,
        resolutions=(Resolution("512x384", "kadid10k/images"),),
        archive_repo=PYIQA_ARCHIVES, archive_file="kadid10k.tgz",
        label_repo=PYIQA_META, label_file="meta_info_KADID10kDataset.csv", label_dir="meta_info",
        label_format="pyiqa", eval_split="val", train_split="train",
        terms="research use; reference photos from Pixabay under the Pixabay License",
        cite="Lin, Hosu, Saupe, KADID-10k, QoMEX 2019",
        note=("81 references x 25 distortions x 5 levels. No official split: pyiqa's 80/20 "
              "split 1 (seed 123)"),
        aliases=("kadid", "kadid-10k"),
    ),
    IQASet(
        name="livec", title="LIVE Challenge (LIVE In the Wild)", images=1_169,
        download_bytes=326_000_000,
        resolutions=(Resolution("500x500", "LIVEC/Images"),),
        archive_repo=PYIQA_ARCHIVES, archive_file="live_challenge.tgz",
        label_repo=PYIQA_META, label_file="meta_info_LIVEChallengeDataset.csv",
        label_dir="meta_info", label_format="pyiqa", eval_split="val", train_split="train",
        terms=_LIVE_TERMS,
        cite="Ghadiyaram & Bovik, Massive Online Crowdsourced Study, IEEE TIP 2016",
        note=("1,162 photos plus the 7 practice photos (t1-t7) most papers drop. No official "
              "split: pyiqa's 80/20 split 1 (seed 123)"),
        aliases=("live_challenge", "live-c", "clive"),
    ),
    IQASet(
        name="agiqa3k", title="AGIQA-3K", images=2_982, download_bytes=98_000_000,
        resolutions=(Resolution("as generated", "AGIQA-3K"),),
        archive_repo=PYIQA_ARCHIVES, archive_file="AGIQA-3K.zip",
        label_repo=DEQA_META, label_file="AGIQA3K/metas/test_agiqa_3k.json",
        label_dir="AGIQA3K/metas", label_format="deqa", eval_split=None, train_split=None,
        # DeQA-Score's gt_score is the raw MOS (build_soft_labels/gen_soft_label.py writes
        # "gt_score": mos); AGIQA-3K's quality MOS is on 0-5 (see labels.KNOWN_FORMATS).
        mos_range=(0.0, 5.0),
        terms=("research use (no licence file in the official repository "
               "lcysyzxdxc/AGIQA-3k-Database; ask the authors for anything else)"),
        cite="Li et al., AGIQA-3K, IEEE TCSVT 2023",
        note=("AI-generated images from 6 text-to-image models; perception MOS only. No train "
              "split is published: DeQA-Score evaluates on all 2,982"),
        aliases=("agiqa", "agiqa-3k"),
        unpack_into="AGIQA-3K",
    ),
)


def find_set(name: str) -> IQASet | None:
    key = name.strip().lower()
    for s in SETS:
        if key == s.name or key in s.aliases:
            return s
    return None


def names() -> list[str]:
    return [s.name for s in SETS]


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
