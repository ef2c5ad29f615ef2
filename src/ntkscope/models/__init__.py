"""Model families with their own state axes: recurrent nets (:mod:`.recurrent`), Transformers
(:mod:`.transformer`) and the α-scaled model of lazy training (:mod:`.lazy`)."""
