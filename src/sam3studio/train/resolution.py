"""Fine-tuning a trained model at another input size.

A ViT trained at one size reads another poorly: its absolute position embeddings are tiled, not
stretched, when the patch grid grows. This rebuilds the model at the new size with the
embeddings it saw in training resampled to the new grid, and keeps the attention window's size
in patches, so that the rotary positions of every layer cover the same range as before (the
global layers scale theirs by window / grid). The masks grow with the grid (4 cells a patch), as
in `demo_architecture`.
"""

from __future__ import annotations

PATCH = 14


def with_input_size(model, processor, image_size: int):
    """(model, processor) reading `image_size`-pixel inputs, the weights otherwise unchanged:
    a new model, and the processor given, set to the new sizes (it serves only this model).
    The same objects when the model already reads that size."""
    import torch
    from transformers import Sam3Config, Sam3Model

    backbone = model.config.vision_config.backbone_config
    if backbone.image_size == image_size:
        return model, processor
    if image_size % PATCH:
        raise ValueError(f"image size {image_size} is not a multiple of the {PATCH}-pixel patch")
    old_grid, grid = backbone.image_size // PATCH, image_size // PATCH
    config = model.config.to_dict()
    vision = config["vision_config"]
    vision["backbone_config"].update(image_size=image_size, pretrain_image_size=image_size)
    vision["backbone_feature_sizes"] = [[grid * 4] * 2, [grid * 2] * 2, [grid] * 2]
    resized = Sam3Model(Sam3Config.from_dict(config))
    weights = model.state_dict()
    embeddings = model.vision_encoder.backbone.embeddings
    key = "vision_encoder.backbone.embeddings.position_embeddings"
    with torch.no_grad():
        seen = embeddings._tile_position_embeddings(embeddings.position_embeddings, old_grid, old_grid)  # as training saw them
        width = seen.shape[-1]
        grid_first = seen.reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
        stretched = torch.nn.functional.interpolate(grid_first.float(), size=(grid, grid), mode="bicubic", align_corners=False)
        weights[key] = stretched.permute(0, 2, 3, 1).reshape(1, grid * grid, width).to(seen.dtype)
    resized.load_state_dict(weights)
    images = processor.image_processor
    images.size = {"height": image_size, "width": image_size}
    images.mask_size = {"height": 4 * grid, "width": 4 * grid}
    processor.target_size = image_size
    return resized.to(next(model.parameters()).device), processor
