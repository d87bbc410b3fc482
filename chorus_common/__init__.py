"""What the two Chorus services share: sampling, the prompt and distribution types, the gRPC server
base, TLS and tokens, process lifecycle and logging. Neither `model_worker` nor `coordinator`
imports the other; both import this (and the generated stubs in `chorus.v1`)."""
