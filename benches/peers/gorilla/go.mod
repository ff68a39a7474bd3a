module shardcast.local/peers/gorilla

go 1.19

require github.com/gorilla/websocket v1.5.0

// Built offline against Debian's golang-github-gorilla-websocket-dev.
replace github.com/gorilla/websocket => /usr/share/gocode/src/github.com/gorilla/websocket
