#!/usr/bin/env python3
"""Writes the small dataset fixtures under tests/data/datasets/ in the real on-disk formats.

The real files (DeepEyes-47k parquet, V* Bench, HR-Bench TSV) cannot be downloaded here, so
this script builds tiny files with the same layout, including deliberately broken rows, for the
loader tests in deepeyes-core/tests/dataset_*.rs. The tests assert exact counts, so when this
script changes, update them too.

Usage:  python scripts/make_dataset_fixtures.py [--out tests/data/datasets]
Needs:  pyarrow, pillow (scripts/requirements.txt).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# The tool prompt the DeepEyes tool rows carry (abridged: the loader does not interpret it).
SYSTEM_TOOL = "You are a helpful assistant.\n\n# Tools\n<tools>image_zoom_in_tool</tools>"
USER_SUFFIX = (
    "\nThink first, call **image_zoom_in_tool** if needed, then answer. "
    "Format strictly as:  <think>...</think>  <tool_call>...</tool_call> (if tools needed)  "
    "<answer>...</answer> "
)


def picture(w: int, h: int, seed: int) -> Image.Image:
    """A small deterministic picture: a background and one coloured box."""
    img = Image.new("RGB", (w, h), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    d = ImageDraw.Draw(img)
    x0, y0 = (seed * 7) % (w // 2), (seed * 5) % (h // 2)
    d.rectangle([x0, y0, x0 + w // 3, y0 + h // 3], fill=(255 - (seed * 37) % 256, 200, 40))
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=80) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# DeepEyes-47k / verl parquet


VERL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("env_name", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("answer", pa.string()),
                    ("index", pa.int64()),
                    ("question", pa.string()),
                    ("split", pa.string()),
                ]
            ),
        ),
    ]
)


def verl_row(index, source, question, answer, images, *, tool=True, ground_truth="same",
             extra_question="same"):
    if source == "thinklite_eureka":
        prompt = [{"role": "user", "content": f"<image>\nSolve it.\nQuestion:\n{question}"}]
    else:
        prompt = [
            {"role": "system", "content": SYSTEM_TOOL},
            {"role": "user", "content": f"<image>\n{question}{USER_SUFFIX}"},
        ]
    return {
        "data_source": source,
        "prompt": prompt,
        "images": images,
        "ability": "math" if source == "thinklite_eureka" else "visual_search",
        "env_name": "visual_toolbox_v2" if tool else None,
        "reward_model": {
            "ground_truth": answer if ground_truth == "same" else ground_truth,
            "style": "model",
        },
        "extra_info": {
            "answer": answer,
            "index": index,
            "question": question if extra_question == "same" else extra_question,
            "split": "train",
        },
    }


def write_verl(out: Path) -> None:
    d = out / "verl"
    d.mkdir(parents=True)
    (d / "images").mkdir()
    encode_file = d / "images" / "side_0.png"
    encode_file.write_bytes(encode(picture(40, 30, 99), "PNG"))

    def img(seed, fmt="JPEG", w=48, h=32):
        return [{"bytes": encode(picture(w, h, seed), fmt), "path": None}]

    rows = [
        # row group 0 (rows 0-3)
        verl_row(0, "vstar", "What is the color of the umbrella?", "red", img(0)),
        verl_row(1, "vstar", "Is the cup left of the plate?", "yes", img(1, "PNG")),
        # undecodable image bytes
        verl_row(2, "vstar", "What is written on the sign?", "stop",
                 [{"bytes": b"\x00\x01 definitely not an image", "path": None}]),
        verl_row(3, "chart", "Which bar is tallest? A. 2019 B. 2020 C. 2021", "B", img(3)),
        # row group 1 (rows 4-7)
        # missing ground truth (null) and no extra_info.answer
        {**verl_row(4, "chart", "What is the y-axis label?", "GDP", img(4)),
         "reward_model": {"ground_truth": None, "style": "model"},
         "extra_info": {"answer": None, "index": 4, "question": "What is the y-axis label?",
                        "split": "train"}},
        # no extra_info.question: the question comes from the user message
        verl_row(5, "thinklite_eureka", "Find x if 2x = 6.", "\\boxed{3}", img(5),
                 tool=False, extra_question=None),
        # image stored by path, next to the parquet file
        verl_row(6, "vstar", "What animal is on the bench?", "cat",
                 [{"bytes": None, "path": "images/side_0.png"}]),
        # image path that does not exist
        verl_row(7, "vstar", "What is the man holding?", "kite",
                 [{"bytes": None, "path": "images/missing.png"}]),
        # row group 2 (rows 8-11)
        # empty image list
        verl_row(8, "vstar", "How many birds are there?", "3", []),
        # two images
        verl_row(9, "chart", "Do the two charts agree?", "no", img(9) + img(10, "PNG")),
        # ground truth only in extra_info.answer
        {**verl_row(10, "chart", "What is the peak value?", "42", img(11)),
         "reward_model": {"ground_truth": None, "style": "model"}},
        # no prompt at all
        {**verl_row(11, "vstar", "What colour is the car?", "blue", img(12)), "prompt": None},
        # row group 3 (row 12)
        verl_row(12, "thinklite_eureka", "Compute 7 * 6.", "\\boxed{42}", img(13), tool=False),
    ]
    table = pa.Table.from_pylist(rows, schema=VERL_SCHEMA)
    pq.write_table(table, d / "deepeyes_sample.parquet", row_group_size=4, compression="snappy")

    # A parquet file that is not a verl dataset.
    pq.write_table(pa.table({"question": ["q"], "label": [1]}), d / "not_verl.parquet")


# ----------------------------------------------------------------------------------------------
# V* Bench


def write_vstar(out: Path) -> None:
    root = out / "vstar"
    attr = root / "direct_attributes"
    rel = root / "relative_position"
    attr.mkdir(parents=True)
    rel.mkdir(parents=True)

    def pair(folder, name, seed, anno, *, image_bytes=None):
        data = image_bytes if image_bytes is not None else encode(picture(64, 48, seed), "JPEG")
        (folder / f"{name}.jpg").write_bytes(data)
        if anno is not None:
            text = anno if isinstance(anno, str) else json.dumps(anno)
            (folder / f"{name}.json").write_text(text)

    pair(attr, "sa_10001", 1, {
        "target_object": ["umbrella"], "bbox": [[10, 8, 12, 9]],
        "question": "What is the color of the umbrella?",
        "options": ["The color of the umbrella is red.", "The color of the umbrella is blue.",
                    "The color of the umbrella is green.", "The color of the umbrella is white."],
    })
    pair(attr, "sa_10002", 2, {
        "target_object": ["glove"], "bbox": [[30, 20, 6, 5]],
        "question": "What is the material of the glove?",
        "options": ["leather", "cotton", "rubber", "wool"],
    })
    # invalid JSON
    pair(attr, "sa_10003", 3, '{"question": "What is the color of the cup?", "options": [')
    # options missing
    pair(attr, "sa_10004", 4, {"target_object": ["sign"], "bbox": [[1, 1, 5, 5]],
                               "question": "What does the sign say?"})
    # an image with no annotation
    pair(attr, "sa_10005", 5, None)

    pair(rel, "sa_20001", 6, {
        "target_object": ["cat", "dog"], "bbox": [[2, 3, 10, 10], [40, 20, 12, 14]],
        "question": "Is the cat on the left or right side of the dog?",
        "options": ["The cat is on the left side of the dog.",
                    "The cat is on the right side of the dog."],
    })
    # an image that is not an image
    pair(rel, "sa_20002", 7, {
        "target_object": ["car", "tree"], "bbox": [[1, 1, 4, 4], [20, 20, 4, 4]],
        "question": "Is the car on the left or right side of the tree?",
        "options": ["left", "right"],
    }, image_bytes=b"\xff\xd8\xff garbage that only starts like a JPEG")


# ----------------------------------------------------------------------------------------------
# HR-Bench TSV


def write_hrbench(out: Path) -> None:
    d = out / "hrbench"
    d.mkdir(parents=True)
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "image",
              "cycle_category"]

    def b64(seed, fmt="JPEG"):
        return base64.b64encode(encode(picture(80, 45, seed), fmt)).decode()

    rows = [
        [0, "What is the number displayed above the entrance?", "A", "single",
         "27B", "37B", "27D", "27E", b64(0), "0"],
        [1, "What colour is the bus next to the tree?", "C", "single",
         "red", "blue", "yellow", "green", b64(1, "PNG"), "0"],
        # a question with a tab, a quote and a newline: written quoted, over two lines
        [2, 'Which sign reads "EXIT\tNOW"?\nPick one.', "B", "cross",
         "the left one", "the right one", "neither", "both", b64(2), "1"],
        # undecodable base64
        [3, "How many windows are lit?", "D", "cross", "1", "2", "3", "4", "@@not-base64@@", "1"],
        # valid base64 that is not an image
        [4, "What is on the roof?", "A", "single", "antenna", "dish", "bird", "nothing",
         base64.b64encode(b"plain text, not pixels").decode(), "2"],
        # answer letter with no option
        [5, "Which flag is highest?", "E", "cross", "red", "blue", "white", "black", b64(5), "2"],
        # empty question
        [6, "", "A", "single", "a", "b", "c", "d", b64(6), "3"],
        [7, "What time does the clock show?", "b", "cross", "3:15", "4:20", "5:45", "6:05",
         b64(7), "3"],
    ]
    with open(d / "hr_bench_mini.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(header)
        for r in rows[:6]:
            w.writerow(r)
        # a row with too few fields (no category, no cycle_category)
        f.write("99\tIs the door open?\tA\tyes\tno\tmaybe\tunknown\t" + b64(99) + "\n")
        for r in rows[6:]:
            w.writerow(r)

    # A TSV without the image column.
    with open(d / "no_image_column.tsv", "w", newline="") as f:
        f.write("index\tquestion\tanswer\tA\tB\n0\tq\tA\tx\ty\n")


# ----------------------------------------------------------------------------------------------
# SynthV* and generic JSONL


def write_jsonl(out: Path) -> None:
    d = out / "synthv"
    (d / "images").mkdir(parents=True)
    for i in range(4):
        picture(96, 64, 20 + i).save(d / "images" / f"{i:06d}.png")
    (d / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing valid")

    def row(i, **kw):
        base = {
            "id": f"synthv-{i:06d}",
            "image": f"images/{i:06d}.png",
            "question": f"What colour is the small square in picture {i}?",
            "options": ["red", "green", "blue", "yellow"],
            "answer": "green",
            "bbox": [10, 12, 30, 28],
            "category": "color",
            "data_source": "synthv",
            "difficulty": i % 3,
        }
        base.update(kw)
        return {k: v for k, v in base.items() if v is not None}

    lines = [
        json.dumps(row(0)),
        json.dumps(row(1, answer="C", category="count")),
        "",  # a blank line is ignored
        json.dumps(row(2, image="images/absent.png")),           # missing image file
        json.dumps(row(3, bbox=[50, 10, 120, 40])),              # box outside the 96x64 image
        '{"id": "synthv-bad", "question": "unterminated',        # invalid JSON
        json.dumps(row(4, image="images/000002.png", question=None)),  # missing question
        json.dumps(row(5, image="images/000003.png", options="red, green")),  # wrong type
        json.dumps(row(6, image="images/broken.png")),           # undecodable image
        json.dumps(row(7, image="images/000003.png", answer="purple")),  # answer not an option
        json.dumps(row(8, image="images/000000.png", bbox=None)),  # SynthV* needs a box
        json.dumps(row(9, image="images/000001.png", answer_index=3, answer=None,
                       bboxes=[[0, 0, 10, 10]], bbox=None)),
    ]
    (d / "synthv_mini.jsonl").write_text("\n".join(lines) + "\n")

    g = out / "jsonl"
    g.mkdir(parents=True)
    generic = [
        {"question": "Describe the shape.", "image": "../synthv/images/000000.png",
         "answer": "a square"},
        {"id": 17, "question": "Which picture is brighter?",
         "images": ["../synthv/images/000001.png", "../synthv/images/000002.png"],
         "options": ["first", "second"], "answer": "B", "source_url": "local"},
        {"question": "No image here", "answer": "x"},
        {"question": "Where is it?", "image": "../synthv/images/000003.png", "answer": "top",
         "bbox": [1, 2, 3, 4], "data_source": "custom", "category": "where"},
        ["not", "an", "object"],
    ]
    (g / "generic_mini.jsonl").write_text("\n".join(json.dumps(x) for x in generic) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    repo = Path(__file__).resolve().parent.parent
    ap.add_argument("--out", type=Path, default=repo / "tests" / "data" / "datasets")
    args = ap.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_verl(out)
    write_vstar(out)
    write_hrbench(out)
    write_jsonl(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {sum(1 for p in out.rglob('*') if p.is_file())} files, {total} bytes, to {out}")


if __name__ == "__main__":
    main()
