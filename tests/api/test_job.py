"""The job skeleton's helpers: labelled progress (a pipeline's pass, a job's phase)."""

from moecompress.api.job import labelled


class Display:
    def __init__(self):
        self.description, self.lines = "", []

    def relabel(self, description):
        self.description = description

    def __call__(self, done, total):
        self.lines.append((self.description, done, total))


def test_labels_nest_and_plain_callbacks_pass_through():
    display = Display()
    step = labelled(display, "[2/2] quantize")
    labelled(step, "profiling")(1, 3)
    step(2, 3)
    labelled(step, "quantizing")(3, 3)
    assert display.lines == [("[2/2] quantize: profiling", 1, 3), ("[2/2] quantize", 2, 3), ("[2/2] quantize: quantizing", 3, 3)]
    assert labelled(None, "x") is None and labelled(print, "x") is print
