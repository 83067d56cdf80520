"""Offline data the evaluations use: labelled probing tasks built from the embedded corpus
(:mod:`.tasks`) and multiple-choice question sets for unlearning (:mod:`.mcq`)."""
