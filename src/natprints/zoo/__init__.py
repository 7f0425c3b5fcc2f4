"""The zoo: model specs and conditions (:mod:`.spec`), the training loop (:mod:`.train`), and the
stages `zoo` and `derive` that train every model a config asks for (:mod:`.stage`)."""

from natprints.zoo.spec import ModelSpec, condition_members, format_lr, zoo_specs

__all__ = ["ModelSpec", "condition_members", "format_lr", "zoo_specs"]
