"""Option declarations shared by several built-in methods' registrations (imported when plugins register, so
nothing here imports torch)."""

from cirbench.types import OptionSpec

# Pic2Word's training transform, which Context-I2W's code keeps
AUGMENT_RANDOM_RESIZED_CROP = OptionSpec(
    "augment", "Training images: 'random-resized-crop' (the official training transform: RandomResizedCrop(scale "
    "0.9-1.0, bicubic) then RGB) or 'none' (the evaluation preprocessing).", "str", "random-resized-crop",
    choices=("random-resized-crop", "none"))
