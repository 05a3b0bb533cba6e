"""Model architectures and training recipes the project trains itself, starting with "demo":
a small SAM3-architecture model for colored shapes that ships with the package."""

from __future__ import annotations

import gzip
from pathlib import Path

BPE_MERGES = Path(__file__).with_name("clip_bpe_8k.txt.gz")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def clip_tokenizer():
    """CLIP's own BPE tokenizer cut to its 8,000 most frequent merges: ordinary English prompts
    tokenize as CLIP would ("purple" is one token, "triangle" two), with an 8,514-token
    vocabulary instead of 49,408, which keeps a small model's text embedding small."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(BPE_MERGES, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = [*byte_symbols, *(s + "</w>" for s in byte_symbols), *("".join(m) for m in merges), *SPECIAL_TOKENS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def demo_architecture(vocab_size: int, bos: int, eos: int, image_size: int = 336):
    """The demo model: SAM3's architecture at about 1/150 of its size. 336 px input, 24x24
    patches, 96x96 masks; every width 112."""
    from transformers import Sam3Config

    grid = image_size // 14
    width = 112
    return Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": width,
                "intermediate_size": 4 * width,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "image_size": image_size,
                "patch_size": 14,
                "window_size": grid // 3,
                "global_attn_indexes": [1, 3],
                "pretrain_image_size": image_size,
            },
            "fpn_hidden_size": width,
            "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        },
        text_config={
            "model_type": "clip_text_model",
            "vocab_size": vocab_size,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "projection_dim": width,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        geometry_encoder_config={"hidden_size": width, "num_layers": 1, "num_attention_heads": 4, "intermediate_size": 2 * width, "roi_size": 3},
        detr_encoder_config={"hidden_size": width, "num_layers": 2, "num_attention_heads": 4, "intermediate_size": 2 * width},
        detr_decoder_config={"hidden_size": width, "num_layers": 3, "num_queries": 16, "num_attention_heads": 4, "intermediate_size": 2 * width},
        mask_decoder_config={"hidden_size": width, "num_attention_heads": 4},
    )


def build_demo_model(image_size: int = 336, seed: int = 0):
    """A fresh (untrained) demo model and its processor."""
    import torch
    from transformers import Sam3ImageProcessor, Sam3Model, Sam3Processor

    tokenizer = clip_tokenizer()
    bos, eos = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    config = demo_architecture(len(tokenizer), bos, eos, image_size)
    torch.manual_seed(seed)
    model = Sam3Model(config)
    grid = image_size // 14
    image_processor = Sam3ImageProcessor(size={"height": image_size, "width": image_size}, mask_size={"height": 4 * grid, "width": 4 * grid})
    return model, Sam3Processor(image_processor=image_processor, tokenizer=tokenizer)
