# DINO-5scale: C2..C5 plus one extra level (the official 5-scale setting).
_base_ = ["DINO_4scale.py"]

return_interm_indices = [0, 1, 2, 3]
num_feature_levels = 5
