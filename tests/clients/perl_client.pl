#!/usr/bin/perl
# nodemngr interoperability check with Perl's RPC::XML::Client (Debian: librpc-xml-perl).
# Usage: perl_client.pl URL      Prints OK and exits 0, or prints what failed and exits 1.
use strict;
use warnings;
use RPC::XML;
use RPC::XML::Client;

my $url = shift @ARGV or do { print "usage: $0 URL\n"; exit 1 };
my $cli = RPC::XML::Client->new($url);
my $failed = 0;

sub fail { print "FAIL: @_\n"; $failed = 1; }

# Send one call; return the response object, or die with a readable message on a transport error.
sub call {
    my ($method, @args) = @_;
    my $resp = $cli->send_request($method, @args);
    die "$method: transport error: $resp\n" unless ref $resp;
    return $resp;
}

sub call_ok {
    my ($method, @args) = @_;
    my $resp = call($method, @args);
    if ($resp->is_fault) {
        die sprintf("%s: unexpected fault %s: %s\n", $method, $resp->code, $resp->string);
    }
    return $resp;
}

my $ok = eval {
    # 1. newPort with a string info
    my $r1 = call_ok('newPort', RPC::XML::string->new('perl client'));
    die "newPort(string) returned a " . ref($r1) . ", not an int\n"
        unless ref($r1) =~ /^RPC::XML::(int|i4|i8)$/;
    my $p1 = $r1->value;
    print "$p1\n";

    # 2. newPort with a struct info
    my $info = RPC::XML::struct->new({ service => RPC::XML::string->new('echo'),
                                       n => RPC::XML::int->new(3) });
    my $r2 = call_ok('newPort', $info);
    die "newPort(struct) returned a " . ref($r2) . ", not an int\n"
        unless ref($r2) =~ /^RPC::XML::(int|i4|i8)$/;
    my $p2 = $r2->value;
    print "$p2\n";
    fail("newPort gave the same port twice: $p1") if $p1 == $p2;

    # 3. listPorts shows both, with their info
    my $list = call_ok('listPorts')->value;
    die "listPorts did not return an array\n" unless ref $list eq 'ARRAY';
    my %by_port = map { ($_->{port} => $_) } @$list;
    my $e1 = $by_port{$p1};
    my $e2 = $by_port{$p2};
    if (!$e1) { fail("port $p1 missing from listPorts") }
    elsif (!defined $e1->{info} || ref $e1->{info} || $e1->{info} ne 'perl client') {
        fail("port $p1 info is not 'perl client'");
    }
    if (!$e2) { fail("port $p2 missing from listPorts") }
    elsif (ref $e2->{info} ne 'HASH' || ($e2->{info}{service} // '') ne 'echo'
           || ($e2->{info}{n} // '') ne '3') {
        fail("port $p2 info is not {service: echo, n: 3}");
    }
    for my $e (grep { defined } $e1, $e2) {
        for my $k (qw(port name info pid since)) {
            fail("listPorts entry for $e->{port} has no '$k'") unless exists $e->{$k};
        }
    }
    my @ports = map { $_->{port} } @$list;
    fail("listPorts is not sorted by port") unless join(',', @ports) eq join(',', sort { $a <=> $b } @ports);
    fail("listPorts entry for $p2 has name '" . ($e2->{name} // 'none') . "', not ''")
        if $e2 && (!defined $e2->{name} || $e2->{name} ne '');

    # 3b. lookup by name: the string info is the name; an unknown name is an empty array
    my $found = call_ok('lookup', RPC::XML::string->new('perl client'))->value;
    if (ref $found ne 'ARRAY' || @$found != 1) { fail("lookup('perl client') is not one entry") }
    elsif ($found->[0]{port} != $p1 || ($found->[0]{name} // '') ne 'perl client') {
        fail("lookup('perl client') found port $found->[0]{port} named '" . ($found->[0]{name} // '') . "'");
    }
    my $none = call_ok('lookup', RPC::XML::string->new('no such perl name'))->value;
    fail("lookup of an unknown name is not an empty array") unless ref $none eq 'ARRAY' && !@$none;
    my $bad = call('lookup', RPC::XML::int->new(7));
    fail("lookup(7) did not fault with code 3") unless $bad->is_fault && $bad->code == 3;

    # 4. delPort of a port not registered: fault code 1
    my $f = call('delPort', RPC::XML::int->new(1));
    if (!$f->is_fault) { fail("delPort(1) did not fault") }
    else {
        my $code = $f->code;
        my $type = ref $f->{faultCode};
        fail("delPort(1) fault code is '$code', not 1") unless defined $code && $code =~ /^-?\d+$/ && $code == 1;
        fail("delPort(1) faultCode is sent as $type, not as an int")
            unless $type =~ /^RPC::XML::(int|i4)$/;
        fail("delPort(1) fault string is '" . $f->string . "'")
            unless $f->string =~ /Node manager: Unknown port: 1\b/;
    }

    # 5. give both ports back
    for my $p ($p1, $p2) {
        my $v = call_ok('delPort', RPC::XML::int->new($p))->value;
        fail("delPort($p) returned '$v', not 0") unless defined $v && $v eq '0';
    }
    1;
};
if (!$ok) { chomp(my $e = $@ || 'unknown error'); fail($e); }
if ($failed) { exit 1 }
print "OK\n";
exit 0;
