"""Programs as functions: fine-tuning (finetune), the method comparison (compare), the README's demo (demo) and
the toy MLP run (toy), with their Options dataclasses; `options` builds their command lines. The programs in
python/ only parse arguments and call these."""
