"""The host agent: one per GPU host, the only thing that touches its GPUs, taps and VMMs.

    ledger.py   what is leased to whom, on disk (GPUs, taps, addresses, controllers' lease times)
    envstore.py env images kept on this host, content-addressed, received resumably and verified
    host.py     the agent itself: inventory, VMs (create, watch, delete), re-adoption, the reaper
    server.py   its HTTP API on a Unix socket (`hearth agent`)
    client.py   the controller's side: the same API over the socket, locally or forwarded through SSH

The API (JSON; errors are {"error": "..."} with 400 bad input, 404 unknown VM or env image, 409 lease
conflict (or an env image busy or in use), 502 the VMM failed, 507 no room for an env image):

    GET    /v1/info                        agent and cloud-hypervisor versions, VFIO state, GPUs, network
    GET    /v1/gpus                        every usable GPU: NUMA node, IOMMU group functions, who leases it
    PUT    /v1/vms/{id}                    lease the GPUs, make the tap, start and boot the VM (idempotent)
    GET    /v1/vms/{id}?after=N&wait=S     the VM and its events; waits up to S s for more than N events
                       [&until=STATE]      or, with until, for the VM to reach STATE (or fail, stop, end)
                       [&uid=U]            (only the incarnation the controller created as U)
    DELETE /v1/vms/{id}?grace=S            stop it, free its GPUs, tap and address
    POST   /v1/leases/{controller}?ttl=S   the controller is alive: keep its VMs for S more seconds
    DELETE /v1/leases/{controller}         the controller is done: stop all its VMs
    GET    /v1/envs                        env images here (complete, or how much of one has arrived), free disk
    GET    /v1/envs/{sha256}[?size=N]      one: complete, or bytes received; with size, 507 if the rest won't fit
    PUT    /v1/envs/{sha256}?offset=N      the image from byte N on, streamed (X-Hearth-Env-Size: its whole
                                           size); N must be the bytes received; the last byte verifies sha256
    DELETE /v1/envs/{sha256}               remove it (409 while a VM's lease uses it)
"""
