"""Conformance: a bundle checked against its golden data (``model_check``), routing agreement and
near-tie margins (``routing``), locating the first diverging node (``bisection``), onnx's node test
cases on each backend (``ops``), and the JUnit and HTML reports."""
