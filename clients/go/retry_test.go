package halflife_test

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	halflife "github.com/halflife/halflife/clients/go"
	pb "github.com/halflife/halflife/clients/go/halflifev1"
)

// dialCounting dials address with Dial's defaults and counts the attempts each call makes.
func dialCounting(t *testing.T, address string) (*halflife.Client, *int) {
	t.Helper()
	attempts := 0
	count := func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		attempts++
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	c, err := halflife.Dial(context.Background(), address, grpc.WithInsecure(), grpc.WithChainUnaryInterceptor(count))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, &attempts
}

func TestUnavailableIsTriedRetryAttemptsTimes(t *testing.T) {
	c, attempts := dialCounting(t, "127.0.0.1:1") // nothing listens there
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := c.Embedding.GetModelInfo(ctx, &pb.GetModelInfoRequest{})
	if status.Code(err) != codes.Unavailable || *attempts != halflife.RetryAttempts {
		t.Fatalf("got %v after %d attempts, want Unavailable after %d", err, *attempts, halflife.RetryAttempts)
	}
}

func TestACallersOwnCancelIsNotRetried(t *testing.T) {
	c, attempts := dialCounting(t, "127.0.0.1:1")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.Embedding.GetModelInfo(ctx, &pb.GetModelInfoRequest{})
	if status.Code(err) != codes.Canceled || *attempts != 1 {
		t.Fatalf("got %v after %d attempts, want Canceled after 1", err, *attempts)
	}
}

func TestAnEndDuringTheBackoffIsTheCallersOutcome(t *testing.T) {
	restore := halflife.SetBackoffJitter(func(time.Duration) time.Duration { return time.Minute })
	defer restore()
	for _, test := range []struct {
		name string
		end  func() (context.Context, context.CancelFunc)
		want codes.Code
	}{
		{"deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 300*time.Millisecond)
		}, codes.DeadlineExceeded},
		{"cancel", func() (context.Context, context.CancelFunc) {
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(300*time.Millisecond, cancel)
			return ctx, cancel
		}, codes.Canceled},
	} {
		t.Run(test.name, func(t *testing.T) {
			c, attempts := dialCounting(t, "127.0.0.1:1") // nothing listens there: the first try fails at once
			ctx, cancel := test.end()
			defer cancel()
			started := time.Now()
			_, err := c.Embedding.GetModelInfo(ctx, &pb.GetModelInfoRequest{})
			if status.Code(err) != test.want || *attempts != 1 || time.Since(started) > 30*time.Second {
				t.Fatalf("got %v after %d attempts and %v, want %v after 1, during the first backoff",
					err, *attempts, time.Since(started), test.want)
			}
		})
	}
}

func TestACallWithoutDeadlineGetsTheDefault(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0") // accepts connections, never answers
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	saved := halflife.DefaultTimeout
	halflife.DefaultTimeout = 300 * time.Millisecond
	defer func() { halflife.DefaultTimeout = saved }()
	c, _ := dialCounting(t, silent.Addr().String())
	done := make(chan error, 1)
	go func() {
		_, err := c.Embedding.GetModelInfo(context.Background(), &pb.GetModelInfoRequest{})
		done <- err
	}()
	select {
	case err = <-done:
		if status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("got %v, want DeadlineExceeded", err)
		}
	case <-time.After(10 * time.Second): // bounded: without a default the call would wait forever
		t.Fatal("a call without a deadline was still waiting after 10 s")
	}
}
