package halflife_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"

	halflife "github.com/halflife/halflife/clients/go"
)

// The Python client's tests hold the same table (tests/test_cli_client.py).
func TestServerTargetGivesAHostWithoutAPortServesPort(t *testing.T) {
	if halflife.DefaultPort != 50051 {
		t.Fatalf("DefaultPort = %d, want serve's 50051", halflife.DefaultPort)
	}
	for address, want := range map[string]string{
		"localhost":                "localhost:50051",
		"10.0.0.7":                 "10.0.0.7:50051",
		"[::1]":                    "[::1]:50051",
		"localhost:":               "localhost:50051",
		"[::1]:":                   "[::1]:50051",
		" localhost ":              "localhost:50051",
		"localhost:8080":           "localhost:8080",
		"[::1]:1":                  "[::1]:1",
		"10.0.0.7:65535":           "10.0.0.7:65535",
		"unix:/run/halflife.sock":  "unix:/run/halflife.sock",
		"unix:halflife.sock":       "unix:halflife.sock",
		"unix-abstract:halflife":   "unix-abstract:halflife",
		"dns:///example.com:50051": "dns:///example.com:50051",
		"dns:///example.com":       "dns:///example.com",
		"ipv4:10.0.0.7:50051":      "ipv4:10.0.0.7:50051",
		"ipv6:[::1]:50051":         "ipv6:[::1]:50051",
		"DNS:///example.com:50051": "DNS:///example.com:50051", // gRPC reads schemes in any case
		"IPV4:10.0.0.7:50051":      "IPV4:10.0.0.7:50051",
		"127.0.0.1:+80":            "127.0.0.1:80", // as gRPC parses a port: these failed at the first call (a review)
		"localhost:0080":           "localhost:80",
	} {
		if got, err := halflife.ServerTarget(address); got != want || err != nil {
			t.Errorf("ServerTarget(%q) = %q, %v; want %q", address, got, err, want)
		}
	}
}

func TestDialRefusesAnEmptyAddressAURLABadPortAndABareIPv6One(t *testing.T) {
	for address, want := range map[string]string{
		"":                       "halflife: address must be host:port, got an empty string",
		"  ":                     "halflife: address must be host:port, got an empty string",
		"127.0.0.1:0":            "halflife: port must be 1 to 65535, got 0",
		"127.0.0.1:65536":        "halflife: port must be 1 to 65535, got 65536",
		"127.0.0.1:99999":        "halflife: port must be 1 to 65535, got 99999",
		"127.0.0.1:-1":           "halflife: port must be 1 to 65535, got -1",
		"[::1]:70000":            "halflife: port must be 1 to 65535, got 70000",
		"dns:///example.com:0":   "halflife: port must be 1 to 65535, got 0",
		"::1":                    "halflife: an IPv6 address goes in brackets: [::1]:port",
		"fe80::1":                "halflife: an IPv6 address goes in brackets: [fe80::1]:port",
		"1:99999999999999999999": "halflife: port must be 1 to 65535, got 99999999999999999999",
		// gRPC took these for a host, and failed only at the first call.
		"http://127.0.0.1:52401": "halflife: give host:port, not a URL: drop the http://",
		"HTTPS://example.com/":   "halflife: give host:port, not a URL: drop the HTTPS://",
		"localhost:abc":          "halflife: port must be 1 to 65535, got abc",
		"[::1]:http":             "halflife: port must be 1 to 65535, got http",
		"localhost:50051/":       "halflife: port must be 1 to 65535, got 50051/",
		// An IPv6 address with a port, a second colon, no host: these went on to gRPC too (an audit).
		"2001:db8::1:50051":      "halflife: an IPv6 address goes in brackets: [2001:db8::1]:50051",
		"::ffff:127.0.0.1:56110": "halflife: an IPv6 address goes in brackets: [::ffff:127.0.0.1]:56110",
		"h:1:2":                  `halflife: address must be host:port (an IPv6 host in brackets), got "h:1:2"`,
		"[::1:50051":             `halflife: address must be host:port (an IPv6 host in brackets), got "[::1:50051"`,
		":50051":                 `halflife: no host: give host:port, got ":50051"`,
		":":                      `halflife: no host: give host:port, got ":"`,
		"[]:5":                   `halflife: no host: give host:port, got "[]:5"`,
		// A second colon, then none for a port: these became "h:1:50051" and so on (a review).
		"h:1:":        `halflife: address must be host:port (an IPv6 host in brackets), got "h:1:"`,
		"localhost::": `halflife: address must be host:port (an IPv6 host in brackets), got "localhost::"`,
		"[::1]:80:":   `halflife: address must be host:port (an IPv6 host in brackets), got "[::1]:80:"`,
		"::1:":        "halflife: an IPv6 address goes in brackets: [::1]:port",
		// A path, query, user or space in the host: gRPC failed it UNAVAILABLE at the first call, after every retry.
		"localhost/x":       `halflife: address must be host:port, got "localhost/x": a host holds no '/'`,
		"localhost/x:50051": `halflife: address must be host:port, got "localhost/x:50051": a host holds no '/'`,
		"user@h:5":          `halflife: address must be host:port, got "user@h:5": a host holds no '@'`,
		"h?x":               `halflife: address must be host:port, got "h?x": a host holds no '?'`,
		"h#x:1":             `halflife: address must be host:port, got "h#x:1": a host holds no '#'`,
		`h\x`:               `halflife: address must be host:port, got "h\\x": a host holds no '\\'`,
		"a b:1":             `halflife: address must be host:port, got "a b:1": a host holds no ' '`,
		// A control character, or bytes that are no UTF-8: gRPC's "Misformatted domain name" at the first call.
		"h\x01:1":              `halflife: address must be host:port, got "h\x01:1": an address holds no '\x01'`,
		"unix:/run/h\xff.sock": `halflife: address must be host:port, got "unix:/run/h\xff.sock": an address is UTF-8 text`,
	} {
		c, err := halflife.Dial(context.Background(), address)
		if c != nil || err == nil || err.Error() != want {
			if c != nil {
				c.Close()
			}
			t.Errorf("Dial(%q) = %v, %v; want the error %q", address, c, err, want)
		}
	}
}

// A host without a port went to gRPC's 443. The dialer of the test records
// where gRPC connects, and connects nowhere: 50051 may be in use here.
func TestDialConnectsAHostWithoutAPortToServesPort(t *testing.T) {
	dialled := make(chan string, 16)
	record := func(_ context.Context, addr string) (net.Conn, error) {
		select {
		case dialled <- addr:
		default:
		}
		return nil, errors.New("not connecting in a test")
	}
	c, err := halflife.Dial(context.Background(), "127.0.0.1", grpc.WithInsecure(), grpc.WithContextDialer(record))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.Conn().Target(); got != "127.0.0.1:50051" {
		t.Errorf("Target() = %q, want 127.0.0.1:50051", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := c.Embed(ctx, []string{"a call makes gRPC connect"}); err == nil {
		t.Fatal("a call succeeded through a dialer that connects nowhere")
	}
	select {
	case addr := <-dialled:
		if addr != "127.0.0.1:50051" {
			t.Errorf("gRPC dialled %q, want 127.0.0.1:50051", addr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("gRPC dialled nothing in 10 s")
	}
}
