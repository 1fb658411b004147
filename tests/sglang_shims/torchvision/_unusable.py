"""What every stand-in function does: refuse loudly instead of computing something wrong."""


def unusable(qualname):
    def fn(*args, **kwargs):
        raise RuntimeError(
            f"{qualname}: kvstore's torchvision test stand-in cannot run image transforms "
            "(image preprocessing is not part of the SGLang KV-cache tests)"
        )

    fn.__qualname__ = fn.__name__ = qualname.rsplit(".", 1)[-1]
    return fn


def module_getattr(module_name):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return unusable(f"{module_name}.{name}")

    return __getattr__
