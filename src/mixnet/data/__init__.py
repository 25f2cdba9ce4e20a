"""Images in: loading and checking photos, folders of labelled photos, transforms, ImageNet class names."""
