"""Offline model tools: conversion, quantization, evaluation, the release gate, sample images, the detect CLI."""
