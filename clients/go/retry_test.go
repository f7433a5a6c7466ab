package halflife_test

import (
	"context"
	"errors"
	"math/rand"
	"net"
	"sync/atomic"
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
	halflife.DefaultTimeout = time.Hour // too late for c: Dial has read it
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

// codeServer answers every GetModelInfo with its code, counting the tries.
type codeServer struct {
	pb.UnimplementedEmbeddingServiceServer
	code  codes.Code
	tries int32
}

func (s *codeServer) GetModelInfo(context.Context, *pb.GetModelInfoRequest) (*pb.GetModelInfoResponse, error) {
	atomic.AddInt32(&s.tries, 1)
	return &pb.GetModelInfoResponse{}, status.Error(s.code, "as the test chose") // codes.OK: no error
}

// serveCode starts an in-process server on 127.0.0.1 that answers code.
func serveCode(t *testing.T, code codes.Code) (address string, server *codeServer) {
	t.Helper()
	server = &codeServer{code: code}
	return serveEmbedding(t, server), server
}

// serveEmbedding starts an in-process EmbeddingService on 127.0.0.1, stopped when the test ends.
func serveEmbedding(t *testing.T, service pb.EmbeddingServiceServer) (address string) {
	t.Helper()
	return serve(t, func(s *grpc.Server) { pb.RegisterEmbeddingServiceServer(s, service) })
}

// serve starts an in-process server on 127.0.0.1 of the services register adds, stopped when the test ends.
func serve(t *testing.T, register func(*grpc.Server)) (address string) {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	register(s)
	go s.Serve(listener)
	t.Cleanup(s.Stop)
	return listener.Addr().String()
}

func TestWhichStatusesAreRetried(t *testing.T) {
	restore := halflife.SetBackoffJitter(func(time.Duration) time.Duration { return 0 })
	defer restore()
	for _, test := range []struct {
		code  codes.Code
		tries int32
	}{
		{codes.InvalidArgument, 1},
		{codes.NotFound, 1},
		{codes.DeadlineExceeded, 1}, // the server's: the caller's deadline has not passed
		{codes.ResourceExhausted, 1},
		{codes.FailedPrecondition, 1},
		{codes.Unavailable, halflife.RetryAttempts},
		{codes.Canceled, halflife.RetryAttempts}, // a server shutting down
	} {
		t.Run(test.code.String(), func(t *testing.T) {
			address, server := serveCode(t, test.code)
			c, _ := dialCounting(t, address)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_, err := c.Embedding.GetModelInfo(ctx, &pb.GetModelInfoRequest{})
			if tries := atomic.LoadInt32(&server.tries); status.Code(err) != test.code || tries != test.tries {
				t.Fatalf("got %v after %d tries, want %v after %d", err, tries, test.code, test.tries)
			}
		})
	}
}

// abortingInterest answers ABORTED to its first aborts RecordEvents calls (as
// the server does when the events' items change under each of its tries) and
// to every GetProfile, counting the tries of each.
type abortingInterest struct {
	pb.UnimplementedInterestServiceServer
	aborts                    int32
	recordTries, profileTries int32
}

func (s *abortingInterest) RecordEvents(_ context.Context, req *pb.RecordEventsRequest) (*pb.RecordEventsResponse, error) {
	if atomic.AddInt32(&s.recordTries, 1) <= s.aborts {
		return nil, status.Error(codes.Aborted, "items changed; nothing was recorded, retry")
	}
	return &pb.RecordEventsResponse{AcceptedCount: int32(len(req.Events))}, nil
}

func (s *abortingInterest) GetProfile(context.Context, *pb.GetProfileRequest) (*pb.GetProfileResponse, error) {
	atomic.AddInt32(&s.profileTries, 1)
	return nil, status.Error(codes.Aborted, "never retried")
}

func TestAbortedIsRetriedForRecordEventsOnly(t *testing.T) {
	restore := halflife.SetBackoffJitter(func(time.Duration) time.Duration { return 0 })
	defer restore()
	server := &abortingInterest{aborts: halflife.RetryAttempts - 1}
	c, _ := dialCounting(t, serve(t, func(s *grpc.Server) { pb.RegisterInterestServiceServer(s, server) }))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	event := &pb.Event{EventId: "e-1", UserId: "u-1", Type: pb.EventType_EVENT_TYPE_VIEW, ItemId: "i-1"}
	reply, err := c.Interest.RecordEvents(ctx, &pb.RecordEventsRequest{Events: []*pb.Event{event}})
	if tries := atomic.LoadInt32(&server.recordTries); err != nil || reply.AcceptedCount != 1 || tries != halflife.RetryAttempts {
		t.Fatalf("RecordEvents: got %v after %d tries, want success after %d", err, tries, halflife.RetryAttempts)
	}
	_, err = c.Interest.GetProfile(ctx, &pb.GetProfileRequest{UserId: "u-1"})
	if tries := atomic.LoadInt32(&server.profileTries); status.Code(err) != codes.Aborted || tries != 1 {
		t.Fatalf("GetProfile: got %v after %d tries, want Aborted after 1", err, tries)
	}
}

func TestACallAfterCloseIsNotRetried(t *testing.T) {
	address, _ := serveCode(t, codes.OK)
	c, attempts := dialCounting(t, address)
	c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := c.Embedding.GetModelInfo(ctx, &pb.GetModelInfoRequest{})
	if status.Code(err) != codes.Canceled || *attempts != 1 {
		t.Fatalf("got %v after %d attempts, want Canceled after 1", err, *attempts)
	}
}

// holdServer keeps every GetModelInfo until its caller goes, saying when one has arrived.
type holdServer struct {
	pb.UnimplementedEmbeddingServiceServer
	arrived chan struct{}
}

func (s *holdServer) GetModelInfo(ctx context.Context, _ *pb.GetModelInfoRequest) (*pb.GetModelInfoResponse, error) {
	s.arrived <- struct{}{}
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestACallInFlightWhenTheClientClosesIsCanceled(t *testing.T) {
	server := &holdServer{arrived: make(chan struct{}, 1)}
	c, attempts := dialCounting(t, serveEmbedding(t, server))
	done := make(chan error, 1)
	go func() {
		_, err := c.Embedding.GetModelInfo(context.Background(), &pb.GetModelInfoRequest{})
		done <- err
	}()
	select {
	case <-server.arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the call did not reach the server in 10 s")
	}
	c.Close()
	select {
	case err := <-done: // it was Unavailable ("transport is closing"), which says "retry" (a review)
		if status.Code(err) != codes.Canceled || *attempts != 1 {
			t.Fatalf("got %v after %d attempts, want Canceled after 1", err, *attempts)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the call was still waiting 10 s after Close")
	}
}

func TestADefaultTimeoutOfZeroIsNoDeadline(t *testing.T) {
	address, _ := serveCode(t, codes.OK)
	saved := halflife.DefaultTimeout
	halflife.DefaultTimeout = 0
	defer func() { halflife.DefaultTimeout = saved }()
	hasDeadline := true
	check := func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		_, hasDeadline = ctx.Deadline()
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	c, err := halflife.Dial(context.Background(), address, grpc.WithInsecure(), grpc.WithChainUnaryInterceptor(check))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Embedding.GetModelInfo(context.Background(), &pb.GetModelInfoRequest{}); err != nil || hasDeadline {
		t.Fatalf("got %v, deadline %v; want success without a deadline", err, hasDeadline)
	}
}

// Go 1.19 seeds math/rand's global source with 1, so jitter drawn from it is
// the same in every process: the package's draws must not come from that
// sequence. (Int63n of a power of two masks one Int63: a draw at any position
// of the sequence is among the first 100,000 below.)
func TestJitterIsNotMathRandsSeedOne(t *testing.T) {
	const backoff = time.Duration(1 << 62)
	seedOne := rand.New(rand.NewSource(1))
	known := make(map[time.Duration]bool)
	for i := 0; i < 100000; i++ {
		known[time.Duration(seedOne.Int63n(int64(backoff)))] = true
	}
	for i := 0; i < 3; i++ {
		if d := halflife.DefaultBackoffJitter(backoff); known[d] {
			t.Fatalf("draw %d, %v, is one of math/rand's seed-1 sequence", i, d)
		}
	}
}

// oldInterest lists events as a server from before ListEvents' newest_first
// did: oldest first, without the field that echoes the order.
type oldInterest struct {
	pb.UnimplementedInterestServiceServer
}

func (oldInterest) ListEvents(context.Context, *pb.ListEventsRequest) (*pb.ListEventsResponse, error) {
	return &pb.ListEventsResponse{Events: []*pb.Event{{EventId: "oldest"}, {EventId: "newest"}}}, nil
}

func TestEachEventRefusesAServerFromBeforeNewestFirstOrATimeRange(t *testing.T) {
	c, _ := dialCounting(t, serve(t, func(s *grpc.Server) { pb.RegisterInterestServiceServer(s, oldInterest{}) }))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	seen := 0
	count := func(*pb.Event) error { seen++; return nil }
	err := c.EachEvent(ctx, &pb.ListEventsRequest{UserId: "u-1", NewestFirst: true}, count)
	if !errors.Is(err, halflife.ErrServerTooOld) || seen != 0 {
		t.Fatalf("newest first: got %v after %d events, want ErrServerTooOld before any", err, seen)
	}
	err = c.EachEvent(ctx, &pb.ListEventsRequest{UserId: "u-1", EndTime: halflife.Time(time.Now())}, count)
	if !errors.Is(err, halflife.ErrServerTooOld) || seen != 0 {
		t.Fatalf("a time range: got %v after %d events, want ErrServerTooOld before any", err, seen)
	}
	if err := c.EachEvent(ctx, &pb.ListEventsRequest{UserId: "u-1"}, count); err != nil || seen != 2 {
		t.Fatalf("in the order recorded: got %v after %d events, want both", err, seen)
	}
	if err := c.EachEvent(ctx, nil, count); err != nil || seen != 4 { // nil was a nil dereference (a review)
		t.Fatalf("a nil request: got %v after %d events, want the stand-in's two", err, seen)
	}
}
