"""What is done with finished maps: agreement and conflict between targets (:mod:`.compare`),
boxes and masks from maps (:mod:`.localize`, also ``camlens.localize``)."""
