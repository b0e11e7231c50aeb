# DINO-5scale: C2..C5 plus one extra level, with the official 5-scale batch size (the rest as DINO-4scale).
_base_ = ["DINO_4scale.py"]

batch_size = 1
return_interm_indices = [0, 1, 2, 3]
num_feature_levels = 5
