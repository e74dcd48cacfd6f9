"""Making bundles (torch): export the classifier to ONNX with its gate, check parity with PyTorch,
embed a lung model, write metadata and report, publish atomically (writer); average members into
one ensemble bundle (ensemble). Reading a bundle needs none of this: `covid_cxr.bundle`."""
