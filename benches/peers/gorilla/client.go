// One WebSocket client: readPump publishes what the client sends, writePump delivers what
// the hub queued for it and sends the heartbeat pings. Only writePump writes data frames;
// gorilla's default ping handler answers client pings with WriteControl, which may run
// concurrently with it.

package main

import (
	"log"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

const (
	writeWait      = 10 * time.Second // a write that takes longer drops the client
	pingPeriod     = 20 * time.Second // a ping this often
	pongWait       = 30 * time.Second // silence allowed before the client is dropped
	maxMessageSize = 64 * 1024        // same as shardcast's --max-message-bytes
	sendBudget     = 1 << 20          // bytes queued per client before it is dropped
)

// sendSlots bounds the per-client channel. With the byte budget it makes the queue
// "1 MiB or this many messages, whichever comes first"; the default (see main.go) is
// 1 MiB / 64 B, so for payloads of 64 bytes and more the byte budget decides.
var sendSlots = 16384

type Client struct {
	hub    *Hub
	conn   *websocket.Conn
	topics []string
	send   chan *outbound
	queued atomic.Int64 // bytes in send not yet written
	gone   bool         // owned by the hub goroutine
}

func frameCost(n int) int64 {
	switch {
	case n < 126:
		return int64(n + 2)
	case n < 1<<16:
		return int64(n + 4)
	default:
		return int64(n + 10)
	}
}

// offer queues m for c without blocking; false means c is over budget and must go.
func (c *Client) offer(m *outbound) bool {
	if c.queued.Add(m.cost) > sendBudget {
		c.queued.Add(-m.cost)
		return false
	}
	select {
	case c.send <- m:
		return true
	default:
		c.queued.Add(-m.cost)
		return false
	}
}

func (c *Client) readPump() {
	defer func() {
		c.hub.unregister <- c
		c.conn.Close()
	}()
	c.conn.SetReadLimit(maxMessageSize)
	alive := func() { c.conn.SetReadDeadline(time.Now().Add(pongWait)) }
	alive()
	c.conn.SetPongHandler(func(string) error { alive(); return nil })
	for {
		kind, data, err := c.conn.ReadMessage()
		if err != nil {
			return
		}
		alive()
		if len(c.topics) != 1 {
			continue // a multi-topic connection only receives
		}
		frame, err := websocket.NewPreparedMessage(kind, data)
		if err != nil {
			log.Printf("prepare: %v", err)
			return
		}
		c.hub.broadcast <- publication{c.topics[0], &outbound{frame, frameCost(len(data))}}
	}
}

func (c *Client) writePump() {
	ticker := time.NewTicker(pingPeriod)
	defer func() {
		ticker.Stop()
		c.conn.Close()
	}()
	for {
		select {
		case m, ok := <-c.send:
			c.conn.SetWriteDeadline(time.Now().Add(writeWait))
			if !ok {
				// The hub dropped this client (slow consumer) or it left.
				c.conn.WriteMessage(websocket.CloseMessage,
					websocket.FormatCloseMessage(4008, "slow consumer"))
				return
			}
			err := c.conn.WritePreparedMessage(m.frame)
			c.queued.Add(-m.cost)
			if err != nil {
				return
			}
		case <-ticker.C:
			c.conn.SetWriteDeadline(time.Now().Add(writeWait))
			if err := c.conn.WriteMessage(websocket.PingMessage, nil); err != nil {
				return
			}
		}
	}
}
