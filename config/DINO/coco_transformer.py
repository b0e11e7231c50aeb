# Data settings shared by the DINO configs: COCO layout under --coco_path and DINO's augmentation.
data_aug_scales = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
data_aug_max_size = 1333
data_aug_scales2_resize = [400, 500, 600]
data_aug_scales2_crop = [384, 600]
data_aug_val_size = None  # None: max(data_aug_scales)
data_aug_hflip = True

# Custom COCO-format datasets: point these at any image folder / instances JSON (None: derive from --coco_path).
train_img_folder = None
train_ann_file = None
val_img_folder = None
val_ann_file = None
contiguous_category_ids = False  # True: map arbitrary category ids to labels 0..K-1 (then num_classes = K)
map_classes_by_name = True  # fine-tuning: carry the class rows of classes the checkpoint and the dataset both
                            # name (False: the official behaviour, --finetune_ignore'd heads start fresh)

# Only used with --dataset_file synthetic: the generated shapes dataset.
synthetic_num_train = 2000
synthetic_num_val = 200
synthetic_image_size = 128
