"""For tests that run our Triton kernels on the CPU in Triton's interpreter (TRITON_INTERPRET=1)."""


def patch_interpreter_scalars() -> None:
    """Triton 3.6's interpreter turns scalars into one-element arrays and int() fails on those in
    numpy >= 2.4 ("only 0-dimensional arrays can be converted"); .item() works in every numpy."""
    import triton.runtime.interpreter as interp
    if not hasattr(interp, "_patch_lang_tensor"):
        raise RuntimeError("this Triton's interpreter has no _patch_lang_tensor")
    original = interp._patch_lang_tensor
    if getattr(original, "_scalars_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
    patched._scalars_patched = True
    interp._patch_lang_tensor = patched
