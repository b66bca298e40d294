"""gpt-oss: config, MXFP4 decode/encode, checkpoint I/O, expert math and the forward."""
