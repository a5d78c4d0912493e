"""The generative family: caption decoders (ShowTell, ShowAttTell, UpDown) that write a caption word by word
from the backbone's grid features and a personality trait, with their vocabulary, decoding (greedy,
sampling, beam search), captioning metrics (BLEU, ROUGE-L, CIDEr-D), training loop and evaluation.

Part of the core layer: it imports only from ``transresnet`` core modules.
"""
