"""Random-access data sources: (uint8 HWC image, int label) by index.

`digits` (scikit-learn 8x8 digits, in memory), `image_folder` (class-per-folder images),
`imagenet` (TFDS ArrayRecord, e.g. imagenet2012) and `transforms` (ADM centre crop, model
range). Batching, order and augmentation live in `dit_jax.input_pipeline`.
"""
