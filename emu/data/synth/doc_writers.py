"""PLACEHOLDER: being written."""
def write_mmc4(d, c): raise NotImplementedError
def write_llava_chat(d, c): raise NotImplementedError
def write_llava_edit(d, c): raise NotImplementedError
def write_text(d, c): raise NotImplementedError
def write_vqav2(d, c): raise NotImplementedError
def write_coco(d, c): raise NotImplementedError
