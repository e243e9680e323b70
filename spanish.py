"""Teach the toy Emu3 Spanish with `python train.py finetune`: write the lesson, then score what it learnt.

The toy's world (train.py: one shape, six colours, two sizes, nine places) captioned and questioned in Spanish:
"un círculo rojo pequeño arriba a la izquierda"; "¿De qué color es la forma?" -> "Es rojo.". The toy's BPE learnt
English merges only, so Spanish is spelt nearly letter by letter (a caption is ~38 tokens, an English one 7). The
lesson never shows a scene of train.HELD_OUT, the 36 scenes the toy never saw in English either: a held-out caption
asks for a combination of words the model learnt elsewhere, in a language it learnt from the lesson alone. Some of
the toy's own English lines are mixed in (rehearsal), so that English is not forgotten.

    python spanish.py lesson --out toy/spanish              # lesson.jsonl + 1100 48x48 PNGs
    python train.py finetune --ckpt toy/ckpt --data toy/spanish/lesson.jsonl --out toy/ckpt-es
    python spanish.py eval --ckpt toy/ckpt-es --before toy/ckpt --picture toy/finetune.png

eval judges as `train.py --eval` does: images drawn through sample.images with its defaults (guidance 3, top-k
2048), colour and shape read by train.check's pixel statistics; chat through sample.chat, greedy.
"""
import argparse
import json
import os
import random
import re
import sys
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import sample
import train

SHAPES = {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"}  # all masculine: one agreement
COLOURS = {"red": "rojo", "orange": "naranja", "yellow": "amarillo", "green": "verde", "blue": "azul",
           "purple": "morado"}
SIZES = {"small": "pequeño", "large": "grande"}
SIZES_F = {"small": "pequeña", "large": "grande"}  # agreeing with "la forma"
POSITIONS = {"in the top left": "arriba a la izquierda", "at the top": "arriba",
             "in the top right": "arriba a la derecha", "on the left": "a la izquierda", "in the center": "en el centro",
             "on the right": "a la derecha", "in the bottom left": "abajo a la izquierda", "at the bottom": "abajo",
             "in the bottom right": "abajo a la derecha"}
QUESTIONS = {"¿Qué forma es esta?": "Es un {shape}.", "¿De qué color es la forma?": "Es {colour}.",
             "¿Dónde está la forma?": "Está {pos}.", "¿La forma es grande o pequeña?": "Es {size_f}.",
             "Describe la imagen.": "Un {shape} {colour} {size} {pos}."}
ASKED = (("¿De qué color es la forma?", ("colour",)), ("¿Qué forma es esta?", ("shape",)),
         ("Describe la imagen.", ("shape", "colour")))  # scored by eval, with the words a right answer names


def words(scene):
    shape, colour, size, pos = scene
    return dict(shape=SHAPES[shape], colour=COLOURS[colour], size=SIZES[size], size_f=SIZES_F[size],
                pos=POSITIONS[pos])


def caption(scene):
    return "un {shape} {colour} {size} {pos}".format(**words(scene))


def answer(question, scene):
    return QUESTIONS[question].format(**words(scene))


def lesson(out, n_gen, n_chat, n_english, seed, px=48):
    """Write out/lesson.jsonl and its images: n_gen Spanish captions, n_chat Spanish questions and n_english of the
    toy's own English lines (half captions, half questions), all of trained scenes, each image a fresh drawing."""
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose a new folder")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    kinds = ["gen"] * n_gen + ["chat"] * n_chat + ["en-gen"] * (n_english // 2) + ["en-chat"] * (n_english - n_english // 2)
    rng.shuffle(kinds)
    lines = []
    for i, kind in enumerate(kinds):
        scene = train.random_scene(rng, train.TRAIN_SCENES)
        path = f"images/{i:04d}.png"
        train.draw(scene, px, rng).save(folder / path)
        if kind == "gen":
            lines.append({"prompt": caption(scene), "image": path})
        elif kind == "en-gen":
            lines.append({"prompt": train.caption(scene), "image": path})
        elif kind == "chat":
            q = rng.choice(list(QUESTIONS))
            lines.append({"image": path, "question": q, "answer": answer(q, scene)})
        else:
            q = rng.choice(list(train.QUESTIONS))
            lines.append({"image": path, "question": q, "answer": train.answer(q, scene)})
    with open(folder / "lesson.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    print(f"wrote {folder / 'lesson.jsonl'}: {len(lines)} lines ({n_gen} Spanish captions, {n_chat} Spanish "
          f"questions, {n_english} English lines)")


def score_images(m, captions, scenes, seed):
    """sample.images with its defaults -> (colour right %, shape right %, the images)."""
    got_images = train.run_images(m, captions, seed)
    got = [train.check(im) for im in got_images]
    return (train.pct(g[0] == s[1] for g, s in zip(got, scenes)), train.pct(g[1] == s[0] for g, s in zip(got, scenes)),
            got_images)


def evaluate(ckpt, n_eval, seed, px=48):
    """Print the scores of one checkpoint; returns its pictures of the Spanish captions (for the figure)."""
    m = sample.load(ckpt, "cpu", "float32")
    scenes = [train.HELD_OUT[i % len(train.HELD_OUT)] for i in range(n_eval)]
    es = score_images(m, [caption(s) for s in scenes], scenes, seed)
    en = score_images(m, [train.caption(s) for s in scenes], scenes, seed)
    print(f"{ckpt}: images from held-out captions ({n_eval}): Spanish colour {es[0]}, shape {es[1]}; "
          f"English colour {en[0]}, shape {en[1]}", flush=True)
    rng = random.Random(seed + 1)
    imgs = [train.draw(s, px, rng) for s in scenes]
    for q, keys in ASKED:
        answers = chat(m, q, imgs, px)
        spanish = [a.strip().startswith(("Es ", "Está ", "Un ")) for a in answers]
        forms = {answer(q, s) for s in train.ALL_SCENES}  # every answer this question can have, right or wrong
        whole = [a.strip() in forms for a in answers]
        right = [all(re.search(rf"\b{words(s)[k]}\b", a, re.I) for k in keys) for a, s in zip(answers, scenes)]
        print(f"  chat {q!r}: answered in Spanish {train.pct(spanish)} (a whole, well-spelt answer "
              f"{train.pct(whole)}), naming the right {' and '.join(keys)} {train.pct(right)}  "
              f"(e.g. {answers[0].strip()!r} for {caption(scenes[0])!r})", flush=True)
    answers = chat(m, "What colour is the shape?", imgs, px)
    right = [re.search(rf"\b{s[1]}\b", a) is not None for a, s in zip(answers, scenes)]
    print(f"  chat 'What colour is the shape?': names the right colour {train.pct(right)} "
          f"(e.g. {answers[0].strip()!r})", flush=True)
    return es[2]


def chat(m, question, pictures, px):
    """sample.chat, greedy, images read at px x px: train.run_chat with room for a Spanish answer, spelt nearly
    letter by letter ("Un triángulo amarillo pequeño abajo a la izquierda." is 42 tokens)."""
    return sample.chat(m, [question], pictures, max_new_tokens=64, min_pixels=px * px, max_pixels=px * px)


def picture(path, captions, before, after, px=48, scale=2, cols=4):
    """A figure for the README: per caption, the picture before and after fine-tuning, side by side."""
    s, line = px * scale, 13
    w, h = 2 * s + 12, 3 * line + s + 10  # a cell: the caption on up to three lines, then the two pictures
    rows = -(-len(captions) // cols)
    grid = Image.new("RGB", (cols * w, 14 + rows * h), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=11)  # Pillow's own TrueType font, which has no accented letters: dropped
    d.text((4, 0), "each pair: before | after (accents left out of the labels)", fill=(90, 90, 90), font=font)
    plain = lambda c: "".join(ch for ch in unicodedata.normalize("NFD", c) if not unicodedata.combining(ch))
    for k, (c, b, a) in enumerate(zip(map(plain, captions), before, after)):
        x, y = (k % cols) * w + 4, 14 + (k // cols) * h
        lines, cur = [], ""
        for word in c.split(" "):  # wrap at the cell's width
            if cur and d.textlength(f"{cur} {word}", font=font) > 2 * s + 2:
                lines, cur = lines + [cur], word
            else:
                cur = f"{cur} {word}".strip()
        for i, text in enumerate(lines + [cur]):
            d.text((x, y + i * line), text, fill=(0, 0, 0), font=font)
        for j, im in enumerate((b, a)):
            grid.paste(im.resize((s, s), Image.NEAREST), (x + j * (s + 2), y + 3 * line + 2))
    sample.save_image(grid, Path(path))
    print(f"wrote {path}")


def main(command, out, n_gen, n_chat, n_english, seed, ckpt, before, picture_path, n_eval):
    if command == "lesson":
        return lesson(out, n_gen, n_chat, n_english, seed)
    if n_eval < 1:
        raise ValueError(f"--n-eval {n_eval}: score at least one image")
    if picture_path and (not before or n_eval < len(train.HELD_OUT)):
        raise ValueError(f"--picture needs --before and --n-eval of at least {len(train.HELD_OUT)} (every held-out "
                         f"scene drawn once)")
    if picture_path:
        sample.image_paths(picture_path, 1)  # checked before the long evaluation
    after = evaluate(ckpt, n_eval, seed)
    if before:
        first = evaluate(before, n_eval, seed)
        if picture_path:  # two held-out scenes of each colour, in the order of train.COLOURS, every shape shown
            shapes = train.SHAPES
            pick = [next(i for i, s in enumerate(train.HELD_OUT) if s[:2] == (shapes[(k + j) % len(shapes)], c))
                    for k, c in enumerate(train.COLOURS) for j in (0, 1)]
            picture(picture_path, [caption(train.HELD_OUT[i]) for i in pick], [first[i] for i in pick],
                    [after[i] for i in pick])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=sample.Help)
    p.add_argument("command", choices=["lesson", "eval"], help="write the lesson, or score a checkpoint")
    p.add_argument("--out", default="toy/spanish", help="lesson: the folder to write")
    p.add_argument("--n-gen", type=int, default=600, help="lesson: Spanish caption lines")
    p.add_argument("--n-chat", type=int, default=200, help="lesson: Spanish question lines")
    p.add_argument("--n-english", type=int, default=300, help="lesson: English lines mixed in (half captions)")
    p.add_argument("--seed", type=int, default=0, help="drawing seed (lesson), sampling seed (eval)")
    p.add_argument("--ckpt", default="toy/ckpt-es", help="eval: the fine-tuned checkpoint")
    p.add_argument("--before", default=None, help="eval: also score this one (the checkpoint it started from)")
    p.add_argument("--picture", dest="picture_path", default=None,
                   help="eval with --before: draw the before/after figure to this PNG")
    p.add_argument("--n-eval", type=int, default=72, help="eval: images / questions per score")
    try:
        main(**vars(p.parse_args()))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
