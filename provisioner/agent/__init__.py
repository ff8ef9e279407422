"""The host agent: one per GPU host, the only thing that touches its GPUs, taps and VMMs.

    ledger.py   what is leased to whom, on disk (GPUs, taps, addresses, controllers' leases and identities)
    auth.py     who calls (the socket's peer uid, a controller's secret) and what each may do
    envstore.py env images kept on this host, content-addressed, received resumably and verified
    host.py     the agent itself: inventory, VMs (create, watch, delete), re-adoption, quarantine, housekeeping
    sweep.py    what this agent made that no lease accounts for (VMMs, taps, VM directories)
    keptlogs.py the logs of ended VMs, bounded, off /run
    server.py   its HTTP API on a Unix socket (`hearth agent`), every input checked
    client.py   the controller's side: the same API over the socket, locally or forwarded through SSH
    check.py    `hearth hosts check`: every host's agent, judged in one table

The API (JSON; errors are {"error": "..."} with 400 bad input, 403 not this caller's (auth.py), 404 unknown VM,
env image or route, 409 lease conflict (or an env image busy or in use, or no open lease), 413 a body over
1 MiB, 502 the VMM failed, 507 no room (an env image; the agent's state directory). Who may call what:
"anyone" is whoever reaches the socket (its group), "controller" the VM's or lease's own controller, sending
X-Hearth-Controller and X-Hearth-Secret, from the uid that opened its lease; root (uid 0, naming no
controller) may do everything):

    GET    /v1/info[?image=DIR]            anyone      agent and cloud-hypervisor versions, VFIO state, GPUs,
                                                       quarantined VMs, network; with image, whether it is here
    GET    /v1/gpus                        anyone      every usable GPU: NUMA node, IOMMU group functions, who
                                                       leases it, and why it is quarantined if it is
    GET    /v1/vms                         controller  its VMs (root: every VM)
    PUT    /v1/vms/{id}                    controller  lease the GPUs, make the tap, start and boot the VM
                                                       (idempotent); needs the controller's lease open
    GET    /v1/vms/{id}?after=N&wait=S     controller  the VM and its events; waits up to S s (at most 60) for
                       [&until=STATE]                  more than N events, or with until for the VM to reach
                       [&uid=U]                        STATE (or fail, stop, end); only the incarnation created as U
    GET    /v1/vms/{id}/logs               controller  its serial console and VMM log (an ended VM's, kept bounded)
    DELETE /v1/vms/{id}?grace=S            controller  stop it (S at most 120), free its GPUs, tap and address
    POST   /v1/leases/{controller}?ttl=S   anyone      open the lease: the answer carries its secret, once;
                                           controller  renew it: keep its VMs S (1 to 3600) more seconds
    DELETE /v1/leases/{controller}         controller  the controller is done: stop all its VMs
    GET    /v1/envs                        anyone      env images here (complete, or how much of one has arrived),
                                                       free disk
    GET    /v1/envs/{sha256}[?size=N]      anyone      one: complete, or bytes received; with size, 507 if the
                                                       rest won't fit
    PUT    /v1/envs/{sha256}?offset=N      anyone      the image from byte N on, streamed (X-Hearth-Env-Size: its
                                                       whole size); N must be the bytes received; the last byte
                                                       verifies sha256
    DELETE /v1/envs/{sha256}               anyone      remove it (409 while a VM's lease uses it)
"""
