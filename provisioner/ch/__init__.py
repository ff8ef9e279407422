"""The Cloud Hypervisor backend: the API client, VM configs, the event stream, the process launcher,
and a stand-in VMM for machines where cloud-hypervisor cannot run."""
