# A tiny DINO that learns the generated shapes dataset on a 2-core CPU in minutes (README's demo command).
# How its values were chosen, with the measurements: docs/demo-tuning.md.
_base_ = ["DINO_4scale.py"]

cli_defaults = {"dataset_file": "synthetic", "coco_path": "data/synthetic", "num_workers": 1, "amp": True}
amp_dtype = "auto"  # bfloat16 autocast where the CPU runs it natively; float32 with float32_recipe elsewhere

num_classes = 5  # the 4 shape categories have ids 1..4 (DINO convention: max id + 1)
dn_labelbook_size = 5

data_aug_scales = [128]
data_aug_max_size = 128
data_aug_scales2_resize = None
data_aug_val_size = 128

backbone = "resnet18"
backbone_weights = None  # trained from scratch
backbone_norm = "bn"  # trainable BN and stem: training from scratch, no pretrained weights
backbone_freeze_at = 0
return_interm_indices = [1, 2]  # C3, C4 + two extra levels: layer4 never runs (measured 18% faster per step)

hidden_dim = 128
nheads = 8
dim_feedforward = 512
enc_layers = 2
dec_layers = 2
enc_n_points = 2  # sampling points per level in the encoder (official: 4): faster, the same AP
num_queries = 100
dn_number = 50
num_select = 100

cls_loss = "varifocal"  # IoU-aware scores: AP 0.65 an epoch earlier than focal loss
cls_loss_coef = 3.0  # with varifocal targets a positive weighs its IoU, small early on
use_ema = True  # the EMA of the weights reaches AP 0.65 first; both are evaluated
ema_decay = 0.998
ema_warmup_iters = 200
batch_size = 8
epochs = 5
lr = 0.0007
lr_backbone = 0.0007
lr_scheduler = "step"
lr_drop = 3
# A run that computes in float32 (--no-amp, or a CPU that emulates bfloat16) trains these instead: in float32,
# batch 4 runs more images per second than batch 8 and learns more per epoch. The EMA keeps its horizon in images.
float32_recipe = {"batch_size": 4, "lr": 0.0005, "lr_backbone": 0.0005, "ema_decay": 0.999, "ema_warmup_iters": 400}
