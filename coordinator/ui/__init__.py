"""The fleet dashboard at ``/ui``, served by every coordinator replica from what it mirrors of
etcd (so a standby shows the same fleet as the leader).

    view.py     the JSON view model: a pure function of the records (unit-tested without a browser)
    events.py   recent events, derived by diffing successive views; a bounded ring buffer
    watch.py    keeps the inputs current on this replica and builds views on demand
    app.py      the aiohttp routes: the page, its static files, /ui/api/fleet
    admin.py    drain and undrain, with the admin token only ([coordinator] admin_token_file)
    static/     index.html, app.js, style.css: plain ES modules and CSS, no framework, no CDN
"""
