# DINO-4scale with a ResNet-50: the official hyper-parameters (state_dict compatible with the model zoo).
_base_ = ["coco_transformer.py"]

modelname = "dino"
num_classes = 91

# optimisation
lr = 0.0001
lr_backbone = 1e-05
lr_backbone_names = ["backbone.0"]
weight_decay = 0.0001
batch_size = 2
epochs = 12
lr_scheduler = "step"  # step (lr_drop) | multistep (lr_drop_list) | onecycle
lr_drop = 11
lr_drop_list = [33, 45]
lr_warmup_iters = 0  # N > 0: the lr rises linearly over the first N optimizer steps (not in the official DINO)
clip_max_norm = 0.1
early_stop_patience = 0  # end training after N epochs without a better bbox AP; 0 = off
# Gradient accumulation: one optimizer step per accumulate_steps batches, so the effective batch is
# accumulate_steps x batch_size x processes (losses normalised as one batch of them all). Iterations, the lr
# schedule and save_every_iters count optimizer steps; an epoch's last incomplete window is skipped.
accumulate_steps = 1
# A run continued on another number of processes keeps its global batch by changing accumulate_steps when it
# divides evenly (2 processes x batch 2 continued on 1 process accumulate 2 batches); False: as configured.
keep_global_batch = True
# Mixed precision dtype of --amp: "auto" (bfloat16 where the device runs it natively; else float16 with a loss
# scaler on CUDA, float32 on a CPU), "float16" (CUDA only) or "bfloat16" (CUDA or CPU, slow where emulated).
# The deformable attention's sampling, the matcher and the losses always run in float32.
amp_dtype = "auto"
float32_recipe = {}  # config keys that replace their values when the run computes in float32
use_ema = False
ema_decay = 0.9997
ema_warmup_iters = 0  # 0: fixed decay (official); N: decay * (1 - exp(-step / N)), as RT-DETR and YOLO (2000)

# checkpoints
save_checkpoint_interval = 1
keep_checkpoints = 0  # numbered checkpoints to keep; 0 keeps all
save_every_iters = 0  # also save checkpoint.pth every K iterations; 0 = only at epoch ends
record_sample_ids = False  # append each step's image ids to output_dir/sample_ids/rank{R}.txt (a debugging record)
use_tensorboard = False

# backbone
backbone = "resnet50"  # resnet18/34/50/101 or timm:<model name>
# Starting weights when training from scratch (a checkpoint supplies its own): "imagenet" = torchvision's
# IMAGENET1K_V1 ResNet weights as the official DINO, downloaded once into $TORCH_HOME/hub/checkpoints;
# or the path of a torchvision-format state_dict; or None (random).
backbone_weights = "imagenet"
backbone_freeze_at = 2  # frozen stages: 0 none, 1 stem, 2 stem + layer1 (official), ...
backbone_norm = "frozen_bn"  # frozen_bn | bn | gn
return_interm_indices = [1, 2, 3]
dilation = False

# transformer
position_embedding = "sine"
pe_temperatureH = 20
pe_temperatureW = 20
hidden_dim = 256
nheads = 8
num_queries = 900
enc_layers = 6
dec_layers = 6
dim_feedforward = 2048
dropout = 0.0
transformer_activation = "relu"
num_feature_levels = 4
enc_n_points = 4
dec_n_points = 4
# Query selection from the encoder: False (official) takes the top num_queries tokens by class score, tokens
# in the padding or whose anchor leaves (0.01, 0.99) included (their boxes start at 1.0); True excludes those.
two_stage_mask_invalid = False

# denoising
use_dn = True
dn_number = 100
dn_box_noise_scale = 0.4
dn_label_noise_ratio = 0.5
dn_labelbook_size = 91

# matcher and losses
cls_loss = "focal"  # "varifocal": IoU-aware scores (VarifocalNet, RT-DETR), not in the official DINO
focal_alpha = 0.25
set_cost_class = 2.0
set_cost_bbox = 5.0
set_cost_giou = 2.0
cls_loss_coef = 1.0
bbox_loss_coef = 5.0
giou_loss_coef = 2.0
interm_loss_coef = 1.0

# post-processing
num_select = 300
nms_iou_threshold = -1

# evaluation: "pycocotools" (official) or "faster" (faster-coco-eval, pip install faster-coco-eval: the same 12
# numbers, its matching and accumulation in C++; docs/evaluation.md)
coco_eval_backend = "pycocotools"
