"""Shared building blocks of the methods (data helpers, backbones, CAM, CRF, segmenter).

Modules here register nothing; import what you need from the submodules.
"""
