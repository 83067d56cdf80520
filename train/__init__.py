"""Training stage: the SAE (:mod:`.sae`), its trainer (:mod:`.trainer`), the run loop
(:mod:`.run`) and the orthogonality penalties (:mod:`.variants`)."""
