"""Federated fine-tuning with Flower's deployment engine (``spec.training.federated``).

A SuperLink and one SuperNode per silo run as separate processes; the SuperNodes reach the
SuperLink over TLS. Each SuperNode's ClientApp (:mod:`.client_app`) trains the project's own
model with its own loss and batches (:mod:`.silo`) on that silo's data only, which only it
is told where to find; the ServerApp (:mod:`.server_app`) runs the chosen Flower strategy
on model updates, checkpoints the global weights after every completed round and writes
``model/``, ``metrics.json`` and ``model-card.json`` as ``recjob-train`` does.
:mod:`.local` starts the whole federation on one machine (loopback).

Modules: :mod:`.certs` (TLS material), :mod:`.plan` (silos and their configs),
:mod:`.weights` (what is exchanged), :mod:`.strategy` (Flower strategies with byte
counting and round checkpoints), :mod:`.bundle` (the Flower App the SuperLink ships).
"""
