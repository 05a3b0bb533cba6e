"""Build SAM3 checkpoints with random weights, saved in the real format (config.json,
model.safetensors, tokenizer, processor config) so that they load through `load_model` exactly
like downloaded weights.

"tiny" is for tests (about 1 MB, loads and runs in well under a second on a CPU); "full" is the
real SAM3 architecture (~840 M parameters) for speed and memory measurements, which do not
depend on the weight values. Neither segments anything meaningful.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def byte_level_tokenizer():
    """A CLIP tokenizer with one token per byte and no merges: any text, tiny vocabulary.

    It is built here rather than downloaded, which is all a test model needs.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*alphabet, *(c + "</w>" for c in alphabet), *SPECIAL_TOKENS])}
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_config(vocab_size: int, image_size: int = 112):
    """The SAM3 architecture at toy sizes: 2-layer ViT on 8x8 patches, 8 queries."""
    from transformers import Sam3Config

    grid = image_size // 14
    return Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": image_size,
                "patch_size": 14,
                "window_size": grid // 2,
                "global_attn_indexes": [1],
                "pretrain_image_size": image_size // 2,
            },
            "fpn_hidden_size": 32,
            "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        },
        text_config={
            "model_type": "clip_text_model",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        geometry_encoder_config={"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "roi_size": 3},
        detr_encoder_config={"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
        detr_decoder_config={"hidden_size": 32, "num_layers": 2, "num_queries": 8, "num_attention_heads": 2, "intermediate_size": 64},
        mask_decoder_config={"hidden_size": 32, "num_attention_heads": 2},
    )


SIZES = ("tiny", "full")


def checkpoint_spec(size: str):
    """(Sam3Config, Sam3Processor) for a checkpoint size: "tiny" or "full"."""
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Processor

    tokenizer = byte_level_tokenizer()
    if size == "tiny":
        config = tiny_config(len(tokenizer))
        image_processor = Sam3ImageProcessor(size={"height": 112, "width": 112}, mask_size={"height": 32, "width": 32})
    elif size == "full":
        config = Sam3Config()  # the real sizes, CLIP's 49,408-token embedding included
        bos, eos = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id = bos, eos, eos
        image_processor = Sam3ImageProcessor()
    else:
        raise ValueError(f"Unknown checkpoint size {size!r}: use one of {', '.join(SIZES)}.")
    return config, Sam3Processor(image_processor=image_processor, tokenizer=tokenizer)


def build_random_checkpoint(folder: str | Path, size: str = "tiny", *, seed: int = 0, init_std: float | None = 0.15) -> Path:
    """Write a random-weight SAM3 checkpoint of `size` ("tiny" or "full") to `folder`.

    init_std: redraw every weight matrix from N(0, init_std) so that a tiny model's scores and
    masks spread out (the default 0.02 init leaves all mask logits near zero, where every
    threshold test is a coin toss). None keeps transformers' own init.
    """
    from transformers import Sam3Model

    folder = Path(folder)
    config, processor = checkpoint_spec(size)
    torch.manual_seed(seed)
    model = Sam3Model(config).eval()
    if init_std is not None:
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2:
                    param.normal_(0.0, init_std)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
