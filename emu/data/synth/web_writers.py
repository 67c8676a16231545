"""PLACEHOLDER: being written."""
def write_img2dataset(d, c): raise NotImplementedError
def write_grit(d, c): raise NotImplementedError
def write_webvid(d, c): raise NotImplementedError
def write_ytsb(d, c): raise NotImplementedError
