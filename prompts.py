"""Every prompt format Emu3 knows, as strings of text and special tokens (BAAI `emu3/mllm/processing_emu3.py`:
Emu3Processor; transformers `models/emu3/processing_emu3.py`: Emu3Processor and its chat template).

Each prompt is written as ONE string, the special tokens spelled as their strings ("<|image start|>",
"<|visual token 000123|>", ...), and tokenized once: the tokenizer matches every special string to its id and splits
the text around it, which is exactly what tokenizing the pieces separately gives. This is how both references do it.

    image block     <|image start|> "h*w" <|image token|> [row of w visual tokens, EOL] x h  EOF <|image end|>
    chat            bos "You are a helpful assistant. USER: " image block  question ". ASSISTANT:"
                    (the original's template: the image first, "." appended; --system changes the first sentence)
    raw             bos + the user's text, each "<image>" replaced in order by the next image's block
                    (what transformers' Emu3Processor does with a prompt)
    messages        a conversation rendered as the -hf chat template renders it, then as raw
    image gen       bos text POSITIVE_PROMPT <|image start|> "h*w" <|image token|>   (the grid follows)
                    h x w from the ratio W:H and the pixel area (generate_size)
"""
BOS, BOI, IMG, EOI = "<|extra_203|>", "<|image start|>", "<|image token|>", "<|image end|>"
EOL, EOF = "<|extra_200|>", "<|extra_201|>"
PLACEHOLDER = "<image>"  # where an image goes in a raw prompt or a rendered conversation (transformers' image_token)
SYSTEM = "You are a helpful assistant."
POSITIVE_PROMPT = " masterpiece, film grained, best quality."  # leading space on purpose (official scripts)
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
    "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
ROLES = ("system", "user", "assistant")


def visual_token(k):
    return f"<|visual token {k:06d}|>"


def image_block(codes):
    """codes (h, w) -> the image block string, as the original processor writes it."""
    h, w = codes.shape
    rows = ("".join(visual_token(k) for k in row) for row in codes.tolist())
    # every row, the last included, ends with EOL; then end of frame and end of image
    return f"{BOI}{h}*{w}{IMG}" + EOL.join(rows) + EOL + EOF + EOI


def chat_prompt(question, codes=None, system=SYSTEM):
    """The original chat template; it always puts the image first and appends '.' to the question."""
    image = "" if codes is None else image_block(codes)
    return f"{BOS}{system} USER: {image}{question}. ASSISTANT:"


def count_placeholders(texts):
    return sum(t.count(PLACEHOLDER) for t in texts)


def raw_prompt(text, codes):
    """bos + text, the i-th "<image>" replaced by the block of codes[i] (a list of (h, w) grids, in order)."""
    pieces = text.split(PLACEHOLDER)
    if len(pieces) - 1 != len(codes):
        raise ValueError(f"the prompt has {len(pieces) - 1} {PLACEHOLDER} and {len(codes)} images were given for it")
    return BOS + pieces[0] + "".join(image_block(c) + piece for c, piece in zip(codes, pieces[1:]))


def check_messages(messages, where="messages"):
    """A conversation in transformers' format: a list of {"role": "system" | "user" | "assistant", "content": [
    {"type": "text", "text": ...} | {"type": "image", ...}, ...]}. A one-line ValueError for anything else, a plain
    string content included (the -hf template renders it as nothing, which would drop the text without a word)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, str):
            raise ValueError(f"{where}: message {i} has a string content: write it as "
                             f'[{{"type": "text", "text": {content[:30]!r}}}]')
        if not isinstance(content, list) or not content:
            raise ValueError(f"{where}: message {i} ({m['role']}) has no content")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image") or (kind == "text" and not isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: message {i} has a content part {part!r}; expected "
                                 f'{{"type": "text", "text": ...}} or {{"type": "image", "path": ...}}')
        out.append({"role": m["role"], "content": content})
    return out


def render_messages(messages):
    """A checked conversation -> the text the Emu3 -hf chat template renders with the generation prompt:
    per message, "ROLE: " (nothing for system), its images as "<image>" first, then each text + " "; then
    "ASSISTANT:". Written out in Python (no template engine); tests/test_prompts.py holds it to transformers'
    apply_chat_template on generated conversations."""
    out = []
    for m in messages:
        if m["role"] != "system":
            out.append(m["role"].upper() + ": ")
        out += [PLACEHOLDER for part in m["content"] if part["type"] == "image"]
        out += [part["text"] + " " for part in m["content"] if part["type"] == "text"]
    return "".join(out) + "ASSISTANT:"


def images_needed(questions, n_images, raw=False, conversations=None):
    """How many images each prompt of a chat batch takes, in order, for the three forms (checked before any image
    is read): a conversation its image parts; a raw prompt its <image>s; the original template one image per
    question, with equal counts of questions and images, or one of either shared by all."""
    if conversations:
        return [sum(p["type"] == "image" for msg in conv for p in msg["content"]) for conv in conversations]
    if raw:
        need = [t.count(PLACEHOLDER) for t in questions]
        if sum(need) != n_images:
            raise ValueError(f"the raw prompts hold {sum(need)} {PLACEHOLDER} and {n_images} images were given")
        return need
    if n_images and len(questions) != n_images and 1 not in (len(questions), n_images):
        raise ValueError(f"got {len(questions)} prompts and {n_images} images: give equal numbers, or one of either")
    return [1 if n_images else 0] * max(len(questions), n_images)


def chat_texts(questions, codes, raw=False, conversations=None, system=SYSTEM):
    """The prompt strings of a chat batch; codes: every image's (h, w) code grid, in order."""
    need = images_needed(questions, len(codes), raw, conversations)
    if len(codes) == 1 and len(need) > 1 and not raw and not conversations:
        codes = codes * len(need)  # one image for every question
    grids, texts = iter(codes), []
    for i, n in enumerate(need):
        mine = [next(grids) for _ in range(n)]
        if conversations:
            texts.append(raw_prompt(render_messages(conversations[i]), mine))
        elif raw:
            texts.append(raw_prompt(questions[i], mine))
        else:
            question = questions[i] if len(questions) > 1 else questions[0]
            texts.append(chat_prompt(question, mine[0] if mine else None, system))
    return texts


def gen_prompt(text, h, w):
    """bos + text + <|image start|> "h*w" <|image token|>: the Emu3-Gen prompt for an h x w token grid (the caller
    appends POSITIVE_PROMPT to conditional texts; the negative prompt takes the same image prefix)."""
    return f"{BOS}{text}{BOI}{h}*{w}{IMG}"


def encode(tokenizer, text):
    """A prompt string -> ids: specials matched as tokens, the text between them NFC-normalized and BPE-encoded."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def generate_size(ratio, image_area, factor=8):
    """"W:H" and a target pixel area -> token grid (h, w), as the processors' calculate_generate_size."""
    width, sep, height = ratio.strip().partition(":")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ValueError(f"ratio must be W:H with positive integers (e.g. 16:9), got {ratio!r}")
    if image_area <= 0:
        raise ValueError(f"image area must be positive, got {image_area}")
    width, height = int(width), int(height)
    t = (image_area / (width * height)) ** 0.5
    h, w = int(round(height * t / factor)), int(round(width * t / factor))  # Python round: half to even
    if h < 1 or w < 1:
        raise ValueError(f"image area {image_area} is too small for ratio {ratio}: the token grid would be {h}x{w}")
    return h, w
